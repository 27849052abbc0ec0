"""export-gguf read by llama.cpp itself (llama-cpp-python): same token ids, logits within the export tolerance.

test_gguf.py reads the files back with transformers; this reads them with the program users export for.
llama-cpp-python builds llama.cpp from source (a few minutes); scripts/test.sh installs it (extra `llamacpp`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from test_gguf import MISTRAL_TEMPLATE, TEXTS, bpe_tokenizer, build_model, qtune_main  # noqa: E402

from qtune import gguf_export  # noqa: E402

MORE = [*TEXTS, "emoji 🙂 and 中文 text", "line\n\nbreaks\tand tabs 12345", "trailing spaces  "]
# llama.cpp adds the sentencepiece space prefix to every text and after special tokens, as sentencepiece does; a
# transformers Metaspace tokenizer (Mistral as transformers converts it) does neither when the text already starts
# with a space (export-gguf prints a note). Llama 2's original tokenizer.json (legacy) agrees with llama.cpp there.
LEGACY_ONLY = [" one leading space", "special </s> inside"]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so that most of the tiny model's frequencies are rescaled
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from qtune.tiny import build_sentencepiece_tokenizer

    root = tmp_path_factory.mktemp("llamacpp-models")
    chat = build_sentencepiece_tokenizer()
    chat.chat_template = MISTRAL_TEMPLATE
    return {
        "llama": build_model(root / "llama", "llama", bpe_tokenizer()),
        "qwen2": build_model(root / "qwen2", "qwen2", bpe_tokenizer()),
        "sp-llama": build_model(root / "sp-llama", "llama", build_sentencepiece_tokenizer(legacy=True)),
        "sp-mistral": build_model(root / "sp-mistral", "mistral", chat, seed=1),
        "llama3-rope": build_model(root / "llama3-rope", "llama", bpe_tokenizer(), rope=LLAMA3_ROPE),
    }


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "sp-llama", "sp-mistral", "llama3-rope"])
def test_llama_cpp_reads_the_export_like_the_merged_model(sources, tmp_path, capsys, name, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = sources[name], tmp_path / f"{name}.gguf"
    code, stdout, err = qtune_main(capsys, "export-gguf", src, "--out", out, "--type", qtype)
    assert code == 0, err
    assert "read by llama.cpp (llama-cpp-python" in stdout  # export-gguf's own llama.cpp check ran
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    llm = llama_cpp.Llama(str(out), logits_all=True, n_ctx=256, n_threads=1, verbose=False)
    rel, min_top1 = gguf_export.TOLERANCE[qtype]
    worst, agree, total = 0.0, 0, 0
    for text in MORE + (LEGACY_ONLY if name == "sp-llama" else []):
        ids = tokenizer(text)["input_ids"]
        add_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
        assert llm.tokenize(text.encode(), add_bos=add_bos, special=True) == ids, text
        assert llm.detokenize(ids, special=False).decode() == tokenizer.decode(ids, skip_special_tokens=True)
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        worst = max(worst, float(np.abs(got - want).max() / max(1.0, np.abs(want).max())))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids)
    llm.close()
    print(f"{name} {qtype}: max |Δlogit| / max|logit| {worst:.4f}, top-1 {agree / total:.1%}")
    assert worst <= rel
    assert agree / total >= min_top1


def test_llama_cpp_check_catches_a_file_without_the_rope_scaling(sources, tmp_path):
    """The same weights written without rope_freqs: transformers' reader cannot tell, llama.cpp's logits can."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = sources["llama3-rope"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    config = AutoConfig.from_pretrained(src)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=torch.float32).eval()
    path = tmp_path / "no-rope-freqs.gguf"
    gguf_export.write_gguf(plain, tokenizer, path, "f16", "plain")
    assert gguf_export.read_back_with_llama_cpp(path, plain, tokenizer, "f16", TEXTS)  # right against the plain model
    with pytest.raises(gguf_export.QtuneError, match="llama.cpp's logits are off"):
        gguf_export.read_back_with_llama_cpp(path, model, tokenizer, "f16", TEXTS)
