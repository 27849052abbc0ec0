"""The real-template test corpus: release chat templates and tokenizers of the model families qtune is tested on,
taken from the llama-cpp-python source distribution (which vendors llama.cpp's `models/ggml-vocab-*.gguf` and
`models/templates/*.jinja`) and TRL's own template files. Built once into a cache folder and reused:

    python tests/corpus.py [DIR]      (default: $XDG_CACHE_HOME/qtune-test-corpus, else ~/.cache/...)

Only the few files the tests use are extracted; each GGUF vocabulary is converted once into a transformers
tokenizer folder (loading a GGUF vocabulary takes tens of seconds, the saved folder well under one)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
# Released chat templates as llama.cpp's own tests and llama-cpp-python's formats carry them (the references the
# built-in templates are checked against, byte for byte): tests/test-chat-template.cpp holds each template's
# original Jinja string with the rendering llama.cpp expects of it; llama_chat_format.py a few more, each with the
# model repository it was taken from.
REFERENCE_FILES = {
    "llama_cpp_python-0.3.36/vendor/llama.cpp/tests/test-chat-template.cpp": "test-chat-template.cpp",
    "llama_cpp_python-0.3.36/llama_cpp/llama_chat_format.py": "llama_chat_format.py",
}
VERSION = "2"  # bumped when the corpus gains files: an older cache folder is completed, not reused as is

# family -> (vocabulary in the sdist, release template file: "sdist:NAME" or "trl:NAME")
FAMILIES = {
    "llama-3.1": ("llama-bpe", "sdist:meta-llama-Llama-3.1-8B-Instruct.jinja"),
    "llama-3.2": ("llama-bpe", "sdist:meta-llama-Llama-3.2-3B-Instruct.jinja"),
    "qwen2.5": ("qwen2", "sdist:Qwen-Qwen2.5-7B-Instruct.jinja"),
    "phi-3": ("phi-3", "trl:phi3.jinja"),
    "phi-3.5": ("phi-3", "sdist:microsoft-Phi-3.5-mini-instruct.jinja"),
    # Mistral's Nemo template (system prompt in the last user turn, [TOOL_CALLS]) on the Mistral-7B-v0.1 /
    # Llama-2 SentencePiece vocabulary: its [INST] markers are text there, as in Mistral v0.1's vocabulary
    "mistral-nemo": ("llama-spm", "sdist:mistralai-Mistral-Nemo-Instruct-2407.jinja"),
    # no Gemma-2 vocabulary in the sdist (gemma-4's does not load in transformers): template only
    "gemma-2": (None, "sdist:google-gemma-2-2b-it.jinja"),
}


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qtune-test-corpus"


def _sdist(folder: Path) -> Path:
    """The sdist: a copy already in the folder (or QTUNE_LCPP_SDIST), else `pip download` (PyPI only)."""
    given = os.environ.get("QTUNE_LCPP_SDIST")
    if given and Path(given).is_file():
        return Path(given)
    path = folder / SDIST_FILE
    if path.is_file():
        return path
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    known = Path(os.environ.get("QTUNE_WHEELS") or base / "qtune-wheels") / SDIST_FILE  # where scripts/test.sh puts it
    if known.is_file():
        return known
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "llama-cpp-python",
            SDIST,
            "-d",
            str(folder),
        ],
        check=True,
        capture_output=True,
    )
    return path


def build(folder: Path | None = None) -> Path:
    """The corpus folder: templates/<family>.jinja, tokenizers/<vocab>/ (transformers folders) and
    references.json (the released templates llama.cpp and llama-cpp-python carry: `references`)."""
    import fcntl

    folder = Path(folder or default_dir())
    done = folder / "complete"
    if _is_complete(done):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:  # two pytest-xdist workers: one builds, the other waits for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(done):
            _build(folder)
    return folder


def _is_complete(done: Path) -> bool:
    return done.is_file() and done.read_text().split() == ["ok", VERSION]


def _build(folder: Path) -> None:
    done = folder / "complete"
    (folder / "templates").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizers").mkdir(exist_ok=True)
    wanted_sdist = {t.split(":", 1)[1] for _, t in FAMILIES.values() if t.startswith("sdist:")}
    vocabs = {v for v, _ in FAMILIES.values() if v}
    sources = {}
    with tarfile.open(_sdist(folder)) as tar:
        for member in tar:
            name = member.name
            if name in REFERENCE_FILES:
                sources[REFERENCE_FILES[name]] = tar.extractfile(member).read().decode("utf-8")
            if not name.startswith(MODELS) or not member.isfile():
                continue
            rest = name[len(MODELS) :]
            if rest.startswith("templates/") and rest.split("/", 1)[1] in wanted_sdist:
                (folder / rest).write_bytes(tar.extractfile(member).read())
            elif rest.startswith("ggml-vocab-") and rest.endswith(".gguf") and rest[11:-5] in vocabs:
                (folder / "gguf").mkdir(exist_ok=True)
                (folder / "gguf" / rest).write_bytes(tar.extractfile(member).read())
    refs = {
        "test-chat-template.cpp": _cpp_cases(sources["test-chat-template.cpp"]),
        "llama_chat_format.py": _python_templates(sources["llama_chat_format.py"]),
    }
    (folder / "references.json").write_text(json.dumps(refs, indent=1, ensure_ascii=False), encoding="utf-8")
    import trl

    trl_templates = Path(trl.__file__).parent / "chat_templates"
    for family, (_vocab, source) in FAMILIES.items():
        kind, name = source.split(":", 1)
        src = folder / "templates" / name if kind == "sdist" else trl_templates / name
        (folder / "templates" / f"{family}.jinja").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    from transformers import AutoTokenizer

    for vocab in sorted(vocabs):
        out = folder / "tokenizers" / vocab
        if not (out / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(folder / "gguf"), gguf_file=f"ggml-vocab-{vocab}.gguf")
            tok.chat_template = None  # each test sets the family's release template
            tok.save_pretrained(str(out))
    done.write_text(f"ok {VERSION}\n")


_CPP_FIELD = re.compile(r'/\* \.(\w+)= \*/\s*(?:u8|U8C\()?"((?:[^"\\]|\\.)*)"')
_CPP_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\", "?": "?", "0": "\0"}


def _cpp_string(body: str) -> str:
    """A C++ string literal's text (the escapes test-chat-template.cpp uses)."""
    return re.sub(r"\\(.)", lambda m: _CPP_ESCAPES[m.group(1)], body)


def _cpp_cases(source: str) -> list[dict]:
    """llama.cpp's chat template test cases: name, template (the model's Jinja string), the rendering llama.cpp's
    Jinja engine must give (expected_output_jinja, else expected_output), bos and eos, of its conversation."""
    cases = []
    for block in source.split("/* .name= */")[1:]:
        fields = {k: _cpp_string(v) for k, v in _CPP_FIELD.findall("/* .name= */" + block.split("\n        },")[0])}
        if "template_str" in fields:
            cases.append(
                {
                    "name": fields["name"],
                    "template": fields["template_str"],
                    "expected": fields.get("expected_output_jinja") or fields.get("expected_output", ""),
                    "bos_token": fields.get("bos_token", ""),
                    "eos_token": fields.get("eos_token", ""),
                }
            )
    return cases


def _python_templates(source: str) -> dict:
    """llama-cpp-python's *_CHAT_TEMPLATE strings, each with the `# Source:` line above it."""
    import ast

    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            name = getattr(node.targets[0], "id", "")
            if name.endswith("_CHAT_TEMPLATE"):
                above = lines[node.lineno - 2] if node.lineno >= 2 else ""
                out[name] = {"template": node.value.value, "source": above.removeprefix("# Source:").strip()}
    return out


def references(folder: Path) -> dict:
    return json.loads((folder / "references.json").read_text(encoding="utf-8"))


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
