"""answers trained / answers present per family on a multi-turn set, with whatever qtune is on PYTHONPATH.
usage: PYTHONPATH=<checkout> python scripts/count_trained_answers.py  (the corpus: tests/corpus.py)"""

import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import corpus

from qtune.config import load_recipe
from qtune.errors import QtuneError
from qtune.pipeline import prepare

C = corpus.build()
rows = []
for i in range(6):
    chat = []
    if i % 2:
        chat.append({"role": "system", "content": "Answer in words."})
    for t in range(3):
        chat += [{"role": "user", "content": f"Spell {i}{t}"}, {"role": "assistant", "content": f"number {i} {t}"}]
    rows.append({"messages": chat})
present = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)
for fam, (vocab, _) in corpus.FAMILIES.items():
    if not vocab:
        continue
    tmp = Path(tempfile.mkdtemp())
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {
        "model": {"name": str(C / "tokenizers" / vocab)},
        "quantization": {"bits": None},
        "data": {
            "datasets": [{"path": str(tmp / "d.jsonl")}],
            "max_length": 512,
            "chat_template": (C / "templates" / f"{fam}.jinja").read_text(),
        },
        "output_dir": str(tmp / "run"),
    }
    (tmp / "r.yaml").write_text(yaml.safe_dump(doc))
    try:
        p = prepare(load_recipe(tmp / "r.yaml", []), training=False)
        trained = 0
        for labels in p.examples.labels:
            trained += sum(1 for i, x in enumerate(labels) if x != -100 and (i == 0 or labels[i - 1] == -100))
        print(f"{fam}: {trained}/{present} answers trained")
    except QtuneError as e:
        print(f"{fam}: refused: {e.message[:150]}")
    except Exception as e:
        print(f"{fam}: error: {type(e).__name__}: {str(e)[:150]}")
