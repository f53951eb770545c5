"""Test assets that are not in the repository, fetched once through the package registry and cached.

The cache lives in `.cache/` at the repository root (git-ignored); a fresh clone with registry access
fills it on first use.
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache"

# openai-whisper's sdist ships GPT-2's BPE ranks in tiktoken format.
WHISPER_SDIST = "openai-whisper==20250625"
GPT2_TIKTOKEN_MEMBER = "whisper/assets/gpt2.tiktoken"


def gpt2_tiktoken_path() -> Path:
    """Path of GPT-2's ranks file (gpt2.tiktoken), downloaded with pip on first use."""
    target = CACHE / "gpt2.tiktoken"
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             WHISPER_SDIST, "-d", download],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(download).glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith(GPT2_TIKTOKEN_MEMBER))
            data = archive.extractfile(member).read()
    partial = target.with_suffix(".tmp")
    partial.write_bytes(data)
    os.replace(partial, target)  # never leave a half-written file under the final name
    return target
