"""A Hugging Face Hub on loopback for the tests: the part of the Hub's HTTP API that `huggingface_hub` 2.x calls to
create a model repository, upload to it, branch and tag it, and download from it. The real client (and transformers on
top of it) runs end to end against it; only this server is ours. Repositories live in memory.

Upload, as `HfApi.upload_folder` and `push_to_hub` do it:
    POST /api/repos/create                     {"name", "organization", "visibility"} -> {"url"}; 409 if it exists
    POST /api/validate-yaml                    the metadata of a README.md being committed must be a YAML mapping
    POST /api/models/{repo}/preupload/{rev}    per file: "lfs" (binary, or 10 MB and more, as on the Hub) or "regular"
    POST /{repo}.git/info/lfs/objects/batch    LFS batch API, basic transfer: where to PUT each object and verify it
    POST /api/models/{repo}/commit/{rev}       NDJSON: a header line, then file (base64) / lfsFile / deleted* lines
    POST /api/models/{repo}/branch/{branch}    `create_branch`; POST /api/models/{repo}/tag/{rev}: `create_tag`
    GET  /api/whoami-v2                        the token's user and organizations
Download, as `hf_hub_download`, `from_pretrained` and `snapshot_download` do it:
    GET  /api/models/{repo}[/revision/{rev}]   model info: the commit sha of the revision, the files
    GET  /api/models/{repo}/tree/{rev}[/dir]   the file listing (`list_repo_files`, `list_repo_tree`)
    GET  /api/models/{repo}/refs               branches and tags (`list_repo_refs`)
    HEAD|GET /{repo}/resolve/{rev}/{path}      X-Repo-Commit, ETag (the git blob id), Content-Length; an LFS file
                                               answers 302 to the storage host with X-Linked-Etag (its sha256) and
                                               X-Linked-Size
One account: USER, member of ORGANIZATION, with the write token TOKEN; public repositories are readable without it.
LFS objects are PUT to and served from a second port (the storage host), as the Hub sends them to S3 / its CDN: the
client must not carry the token there. Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound), from which the client raises its exceptions.

Not implemented: xet storage (the client, which prefers it for LFS files, must run with HF_HUB_DISABLE_XET=1, as
`environment()` sets; it then takes the LFS path, which the Hub accepts too), pull requests, datasets and Spaces,
pagination, git over HTTP.
"""

import base64
import hashlib
import json
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_loopback_write_token"
USER = "denseclip-tester"
ORGANIZATION = "denseclip-org"
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub sends files from this size on (and all binary files) to LFS


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}

    def response(self) -> tuple[int, dict, dict]:
        headers = {**self.headers, "X-Error-Message": str(self)}
        if self.code:
            headers["X-Error-Code"] = self.code
        return self.status, headers, {"error": str(self)}


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_binary(sample: bytes) -> bool:
    return b"\0" in sample  # git's rule, which the Hub applies to the first bytes of a file


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The LFS pointer file that git stores in place of an LFS file."""
        lines = ["version https://git-lfs.github.com/spec/v1", f"oid sha256:{self.sha256}", f"size {len(self.data)}"]
        return "".join(f"{line}\n" for line in lines).encode()

    @property
    def blob_id(self) -> str:
        return _git_blob_id(self.pointer if self.lfs else self.data)

    @property
    def upload_oid(self) -> str:
        """What the client compares with the file it is about to upload: the sha256 of LFS files, else the blob id."""
        return self.sha256 if self.lfs else self.blob_id

    def sibling(self, path: str) -> dict:
        """The file in model info."""
        entry = {"rfilename": path, "size": len(self.data), "blobId": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"size": len(self.data), "sha256": self.sha256, "pointerSize": len(self.pointer)}
        return entry

    def listing(self, path: str) -> dict:
        """The file in a tree listing."""
        entry = {"type": "file", "path": path, "oid": self.blob_id, "size": len(self.data)}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Repository:
    private: bool
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # commit sha -> path -> file
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def add_commit(self, parent: str | None, message: str, files: dict[str, StoredFile]) -> str:
        listing = "\n".join(f"{path} {file.blob_id}" for path, file in sorted(files.items()))
        sha = hashlib.sha1(f"parent {parent}\n{message}\n{listing}".encode()).hexdigest()
        self.commits[sha] = files
        return sha

    def resolve(self, revision: str) -> str:
        """The commit sha of a branch, a tag or a full commit sha."""
        sha = self.branches.get(revision) or self.tags.get(revision) or revision
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha


class HubServer:
    """Start with `HubServer.start()`; `environment()` gives the variables that point `huggingface_hub` at it."""

    def __init__(self):
        self.repositories: dict[str, Repository] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.routes_called: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._hub = self._storage = None
        self._client_cache = tempfile.TemporaryDirectory(prefix="loopback-hub-cache-")

    @classmethod
    def start(cls) -> "HubServer":
        server = cls()
        server._hub = _serve(server, "hub", 0)
        server._storage = _serve(server, "storage", 0)
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_port}"

    @property
    def storage_url(self) -> str:
        return f"http://127.0.0.1:{self._storage.server_port}"

    def environment(self) -> dict[str, str]:
        """For `huggingface_hub` clients of this Hub: its URL, no xet, and a download cache of their own (a cache is
        keyed by repository id, not by endpoint)."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_CACHE": self._client_cache.name}

    @contextmanager
    def unreachable(self) -> Iterator[None]:
        """Takes the Hub port down (connections refused) for the duration of the block, then serves it again."""
        port = self._hub.server_port
        _stop(self._hub)
        try:
            yield
        finally:
            self._hub = _serve(self, "hub", port)

    # Access: writes and private repositories need the token, writes also a namespace of its user. Like the Hub, an
    # unauthenticated request for a repository that it cannot see gets 401, not 404.

    def _user(self, headers) -> str | None:
        authorization = headers.get("authorization")
        if authorization is None:
            return None
        if authorization != f"Bearer {TOKEN}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return USER

    def _readable(self, repo_id: str, user: str | None) -> Repository:
        repo = self.repositories.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, user: str | None) -> Repository:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        repo = self._readable(repo_id, user)
        if repo_id.split("/")[0] not in (USER, ORGANIZATION):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # Endpoints: each gets the URL's named groups, the parsed query, the request headers and body, and returns
    # (status, headers, body); a dict or list body is sent as JSON.

    def whoami(self, query, headers, body):
        if self._user(headers) is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        orgs = [{"type": "org", "name": ORGANIZATION}]
        return 200, {}, {"type": "user", "name": USER, "orgs": orgs, "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, query, headers, body):
        user = self._user(headers)
        request = json.loads(body)
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if request.get("type", "model") != "model":
            raise HubError(400, "This test Hub only has model repositories")
        namespace = request.get("organization") or user
        if namespace not in (USER, ORGANIZATION):
            raise HubError(403, f"You don't have the rights to create a repository under {namespace}")
        repo_id = f"{namespace}/{request['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repositories:
            return 409, {}, {"error": "You already created this model repo", "url": url}
        repo = Repository(private=request.get("visibility") == "private")
        repo.branches["main"] = repo.add_commit(None, "initial commit", {})
        self.repositories[repo_id] = repo
        return 200, {}, {"url": url, "name": repo_id}

    def validate_yaml(self, query, headers, body):
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return 400, {}, {"errors": [{"message": f"the metadata is not valid YAML: {error}"}], "warnings": []}
        if not isinstance(metadata, dict):
            return 400, {}, {"errors": [{"message": "the metadata must be a YAML mapping"}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def model_info(self, query, headers, body, repo, revision=None):
        stored = self._readable(repo, self._user(headers))
        sha = stored.resolve(revision or "main")
        files = stored.commits[sha]
        siblings = [file.sibling(path) for path, file in sorted(files.items())]
        info = {"id": repo, "author": repo.split("/")[0], "sha": sha, "private": stored.private, "siblings": siblings}
        return 200, {}, info

    def tree(self, query, headers, body, repo, revision, path=""):
        stored = self._readable(repo, self._user(headers))
        files = stored.commits[stored.resolve(revision)]
        prefix = f"{path}/" if path else ""
        below = {name[len(prefix) :]: file for name, file in files.items() if name.startswith(prefix)}
        if path and not below:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        folders = {"/".join(name.split("/")[:depth]) for name in below for depth in range(1, name.count("/") + 1)}
        listing = [
            {"type": "directory", "path": prefix + folder, "oid": _git_blob_id(folder.encode())}
            for folder in sorted(folders)
            if recursive or "/" not in folder
        ]
        shown = sorted(name for name in below if recursive or "/" not in name)
        listing += [below[name].listing(prefix + name) for name in shown]
        return 200, {}, listing

    def refs(self, query, headers, body, repo):
        stored = self._readable(repo, self._user(headers))

        def listed(kind: str, refs: dict[str, str]) -> list[dict]:
            return [{"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha} for name, sha in refs.items()]

        refs = {"branches": listed("heads", stored.branches), "tags": listed("tags", stored.tags), "converts": []}
        return 200, {}, refs

    def preupload(self, query, headers, body, repo, revision):
        stored = self._writable(repo, self._user(headers))
        current = stored.commits[stored.resolve(revision)]
        answers = []
        for file in json.loads(body)["files"]:
            sample = base64.b64decode(file["sample"])
            mode = "lfs" if file["size"] >= LFS_MIN_SIZE or _is_binary(sample) else "regular"
            existing = current.get(file["path"])
            oid = existing.upload_oid if existing else None
            answers.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return 200, {}, {"files": answers}

    def lfs_batch(self, query, headers, body, repo):
        self._writable(repo, self._user(headers))
        request = json.loads(body)
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]):
            raise HubError(400, "This test Hub only takes LFS uploads through the basic transfer")
        objects = []
        for obj in request["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:  # else no actions: the Hub has it already
                upload, verify = f"{self.storage_url}/lfs/{obj['oid']}", f"{self.url}/lfs/{obj['oid']}/verify"
                answer["actions"] = {"upload": {"href": upload}, "verify": {"href": verify}}
            objects.append(answer)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, {"transfer": "basic", "objects": objects}

    def lfs_upload(self, query, headers, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"The uploaded content does not have the sha256 {oid}")
        self.lfs_objects[oid] = body
        return 200, {"ETag": f'"{oid}"'}, b""

    def lfs_verify(self, query, headers, body, oid):
        stored = self.lfs_objects.get(oid)
        if stored is None or len(stored) != json.loads(body)["size"]:
            raise HubError(404, f"LFS object {oid} was not uploaded")
        return 200, {}, {"success": True}

    def lfs_download(self, query, headers, body, oid):
        if oid not in self.lfs_objects:
            raise HubError(404, f"No LFS object {oid}")
        return 200, {"ETag": f'"{oid}"'}, self.lfs_objects[oid]

    def commit(self, query, headers, body, repo, revision):
        stored = self._writable(repo, self._user(headers))
        if "create_pr" in query:
            raise HubError(400, "This test Hub has no pull requests")
        if revision not in stored.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "A commit starts with a header line")
        parent = stored.branches[revision]
        files = dict(stored.commits[parent])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                if len(data) >= LFS_MIN_SIZE or _is_binary(data[:8000]):
                    raise HubError(400, f"{value['path']} is binary or large: it must be uploaded to LFS")
                files[value["path"]] = StoredFile(data, lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                files[value["path"]] = StoredFile(self.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: file for path, file in files.items() if not path.startswith(folder)}
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        header = lines[0]["value"]
        sha = stored.add_commit(parent, f"{header['summary']}\n\n{header.get('description', '')}", files)
        stored.branches[revision] = sha
        return 200, {}, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

    def create_branch(self, query, headers, body, repo, branch):
        stored = self._writable(repo, self._user(headers))
        if branch in stored.branches:
            raise HubError(409, f"Branch {branch} already exists")
        starting_point = json.loads(body or b"{}").get("startingPoint", "main")
        stored.branches[branch] = stored.resolve(starting_point)
        return 200, {}, {}

    def create_tag(self, query, headers, body, repo, revision):
        stored = self._writable(repo, self._user(headers))
        tag = json.loads(body)["tag"]
        if tag in stored.tags:
            raise HubError(409, f"Tag {tag} already exists")
        stored.tags[tag] = stored.resolve(revision)
        return 200, {}, {}

    def resolve(self, query, headers, body, repo, revision, path):
        stored = self._readable(repo, self._user(headers))
        sha = stored.resolve(revision)
        file = stored.commits[sha].get(path)
        if file is None:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound", {"X-Repo-Commit": sha})
        found = {"X-Repo-Commit": sha, "ETag": f'"{file.blob_id}"'}
        if file.lfs:
            location = f"{self.storage_url}/lfs/{file.sha256}"
            linked = {"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(len(file.data)), "Location": location}
            return 302, {**found, **linked}, b""
        return 200, found, file.data


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REVISION = r"(?P<revision>[^/]+)"
_OID = r"(?P<oid>[0-9a-f]{64})"
# (port, method, path pattern, endpoint); patterns match the path before percent-decoding, groups are decoded after.
_ROUTES = [
    ("hub", "GET", r"/api/whoami-v2", "whoami"),
    ("hub", "POST", r"/api/repos/create", "create_repo"),
    ("hub", "POST", r"/api/validate-yaml", "validate_yaml"),
    ("hub", "GET", rf"/api/models/{_REPO}(?:/revision/{_REVISION})?", "model_info"),
    ("hub", "GET", rf"/api/models/{_REPO}/tree/{_REVISION}(?:/(?P<path>.+))?", "tree"),
    ("hub", "GET", rf"/api/models/{_REPO}/refs", "refs"),
    ("hub", "POST", rf"/api/models/{_REPO}/preupload/{_REVISION}", "preupload"),
    ("hub", "POST", rf"/api/models/{_REPO}/commit/{_REVISION}", "commit"),
    ("hub", "POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
    ("hub", "POST", rf"/api/models/{_REPO}/tag/{_REVISION}", "create_tag"),
    ("hub", "POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("hub", "POST", rf"/lfs/{_OID}/verify", "lfs_verify"),
    ("hub", "HEAD", rf"/{_REPO}/resolve/{_REVISION}/(?P<path>.+)", "resolve"),
    ("hub", "GET", rf"/{_REPO}/resolve/{_REVISION}/(?P<path>.+)", "resolve"),
    ("storage", "PUT", rf"/lfs/{_OID}", "lfs_upload"),
    ("storage", "GET", rf"/lfs/{_OID}", "lfs_download"),
]


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one connection per request, so that no kept-alive connection outlives `HubServer.unreachable()`.

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))  # the client sends no chunked bodies
        try:
            status, headers, content = self._call_endpoint(url, body)
        except HubError as error:
            status, headers, content = error.response()
        except (KeyError, TypeError, ValueError) as error:  # a request that this server does not understand
            status, headers, content = HubError(400, f"Malformed request: {error!r}").response()
        if isinstance(content, dict | list):
            headers = {"Content-Type": "application/json", **headers}
            content = json.dumps(content).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def _call_endpoint(self, url, body: bytes) -> tuple[int, dict, bytes | dict | list]:
        hub = self.server.hub
        for port, method, pattern, endpoint in _ROUTES:
            match = re.fullmatch(pattern, url.path)
            if port == self.server.port_name and method == self.command and match:
                arguments = {name: unquote(value) for name, value in match.groupdict().items() if value is not None}
                with hub._lock:
                    hub.routes_called[endpoint] += 1
                    return getattr(hub, endpoint)(parse_qs(url.query), self.headers, body, **arguments)
        raise HubError(404, f"{self.command} {url.path} is not implemented by the test Hub")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def log_message(self, format, *args) -> None:  # requests are counted in `routes_called`, not printed
        pass


def _serve(hub: HubServer, port_name: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    server.hub, server.port_name = hub, port_name
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()
