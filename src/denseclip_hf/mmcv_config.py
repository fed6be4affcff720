"""Reading the training config that mmcv stores in a checkpoint (`checkpoint["meta"]["config"]`, the text of
`Config.pretty_text`: one `name = value` line per top-level setting, values written as `dict(...)`, lists, tuples and
literals), without running it.

The text is parsed with `ast` and only literal values are evaluated (`dict(key=value, ...)` calls, `{...}`, lists,
tuples, numbers, strings, booleans, `None`); a top-level setting written otherwise (e.g. `gpu_ids = range(0, 8)`) is
left out. Part of the installed package (the converter of the authors' checkpoints reads it), not of saved models.
"""

import ast
from collections.abc import Mapping
from typing import Any


class _NotALiteral(Exception):
    """An expression that is not one of the literal forms mmcv writes."""


def _literal(node: ast.expr) -> Any:
    """The value of a literal expression in mmcv's config syntax."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [_literal(element) for element in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(element) for element in node.elts)
    if isinstance(node, ast.Dict) and all(key is not None for key in node.keys):
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values, strict=True)}
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "dict"
        and not node.args
        and all(keyword.arg is not None for keyword in node.keywords)
    ):
        return {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand)
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    raise _NotALiteral(ast.dump(node)[:80])


def parse_config_text(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The top-level settings of an mmcv config text (`Config.pretty_text`) as plain Python values.

    A mapping is returned as a dict (a config already loaded), `None` as `{}`. Settings whose value is not a literal
    are left out.

    Raises:
        ValueError: the text is not Python syntax (not a config written by mmcv).
        TypeError: `text` is neither a string nor a mapping.
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    if not isinstance(text, str):
        raise TypeError(f"An mmcv config is the text of Config.pretty_text, got a {type(text).__name__}.")
    try:
        tree = ast.parse(text)
    except SyntaxError as error:
        raise ValueError(
            f"The checkpoint's meta['config'] is not an mmcv config text (line {error.lineno}: {error.msg}): remove "
            "it from the checkpoint's meta, or repair it."
        ) from error
    settings = {}
    for statement in tree.body:
        if not (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
            continue
        try:
            settings[statement.targets[0].id] = _literal(statement.value)
        except _NotALiteral:
            continue
    return settings


def config_value(config: Mapping[str, Any], path: str) -> Any:
    """The value at the dotted `path` (`"model.test_cfg.nms.iou_threshold"`), or `None` where any part is missing.
    mmdet 2.x also accepts `train_cfg` / `test_cfg` at the top level (older configs): a `model.train_cfg.*` /
    `model.test_cfg.*` path falls back to them."""
    candidates = [path]
    if path.startswith(("model.train_cfg.", "model.test_cfg.")):
        candidates.append(path.removeprefix("model."))
    for candidate in candidates:
        value: Any = config
        for part in candidate.split("."):
            if not isinstance(value, Mapping) or part not in value:
                value = None
                break
            value = value[part]
        if value is not None:
            return value
    return None


__all__ = ["config_value", "parse_config_text"]
