"""Files shipped with the package."""

from pathlib import Path

# The real CLIP BPE tokenizer (OpenAI CLIP, MIT license; see clip_tokenizer/README.md), loadable with
# `CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_PATH)`: OpenAI/OpenCLIP checkpoint files carry none.
CLIP_TOKENIZER_PATH = str(Path(__file__).parent / "clip_tokenizer")

__all__ = ["CLIP_TOKENIZER_PATH"]
