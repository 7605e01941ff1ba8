"""Llama import: a random Llama matches transformers, directly (hf:DIR) and through a GGUF file
written the way llama.cpp writes one (q/k permuted, byte-level BPE vocabulary and merges)."""

import json
import os
import pathlib

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest

from gptjax.config_schema import ConfigError
from gptjax.model import models
from gptjax.transfer import gguf_convert
from gptjax.transfer import hf_import

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
WIKITEXT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def _wikitext(chars: int) -> str:
  path = WIKITEXT / "wiki.valid.tokens"
  if not path.exists():
    pytest.skip("no wikitext2 in ../shared/data")
  return path.read_text()[:chars]


@pytest.fixture(scope="module")
def byte_bpe():
  """A small byte-level BPE trained on wikitext2, split as SmolLM's (single digits first)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models as tok_models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_wikitext(200_000).split("\n"), trainer)
  return tok


def _llama(vocab: int, tie: bool):
  conf = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5,
                                  tie_word_embeddings=tie)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(conf)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # non-trivial norm scales
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model.eval()


def _logits(model, ids_BxL) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids_BxL)).logits.numpy()


def _ours(hf_dir: str, ids_BxL) -> np.ndarray:
  cfg, params = hf_import.load_hf(hf_dir)
  return np.asarray(models.make_model(cfg).apply({"params": params}, ids_BxL)["logits"])


@pytest.mark.parametrize("tie", [True, False])
def test_llama_logits_match_transformers(tmp_path, tie):
  ref = _llama(97, tie)
  ref.save_pretrained(str(tmp_path), safe_serialization=True)
  ids_BxL = np.random.default_rng(0).integers(0, 97, (2, 13))
  np.testing.assert_allclose(_ours(str(tmp_path), ids_BxL), _logits(ref, ids_BxL), atol=1e-4,
                             rtol=0)


def _write_gguf(path: str, ref, tok, arch: str = "llama", tokenizer_model: str = "gpt2") -> None:
  """What llama.cpp's convert_hf_to_gguf writes for this Llama (float32 tensors)."""
  c = ref.config
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(500.0)  # the theta of _llama
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre("smollm")
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  merges = json.loads(tok.to_str())["model"]["merges"]
  w.add_token_list([t for t, _ in vocab])
  w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
  w.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  for name, p in ref.state_dict().items():
    x = p.numpy().astype(np.float32)
    if name == "model.embed_tokens.weight":
      w.add_tensor("token_embd.weight", x)
    elif name == "model.norm.weight":
      w.add_tensor("output_norm.weight", x)
    elif name == "lm_head.weight":
      if not c.tie_word_embeddings:
        w.add_tensor("output.weight", x)
    else:
      layer, rest = name[len("model.layers."):].split(".", 1)
      kind = names[rest[:-len(".weight")]]
      if kind == "attn_q":
        x = gguf_convert.permute_rotary(x, c.num_attention_heads)
      elif kind == "attn_k":
        x = gguf_convert.permute_rotary(x, c.num_key_value_heads)
      w.add_tensor(f"blk.{layer}.{kind}.weight", x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_conversion_matches_transformers_and_tokenizer(tmp_path, byte_bpe, tie):
  ref = _llama(byte_bpe.get_vocab_size(), tie)
  _write_gguf(str(tmp_path / "m.gguf"), ref, byte_bpe)
  out = tmp_path / "hf"
  config = gguf_convert.convert(str(tmp_path / "m.gguf"), str(out))
  assert config["tie_word_embeddings"] == tie and config["num_key_value_heads"] == 2
  text = _wikitext(3000)[1000:]
  ids = byte_bpe.encode(text).ids[:40]
  np.testing.assert_allclose(_ours(str(out), np.asarray([ids])), _logits(ref, [ids]), atol=1e-4,
                             rtol=0)
  import tokenizers  # pylint: disable=g-import-not-at-top
  rebuilt = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
  sample = text + " 2024 <|endoftext|>"
  assert rebuilt.encode(sample).ids == byte_bpe.encode(sample).ids
  assert rebuilt.decode(rebuilt.encode(text).ids) == text
  source = json.loads((out / "gguf_source.json").read_text())
  assert source["tensor_types"] == ["F32"] and len(source["sha256"]) == 64


def test_rotary_permutation_round_trips():
  w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)
  permuted = gguf_convert.permute_rotary(w, 6)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(gguf_convert.unpermute_rotary(permuted, 6), w)


def test_unsupported_gguf_is_one_line(tmp_path, byte_bpe):
  ref = _llama(byte_bpe.get_vocab_size(), True)
  _write_gguf(str(tmp_path / "a.gguf"), ref, byte_bpe, arch="falcon")
  with pytest.raises(ConfigError, match=r"^gguf: general.architecture='falcon' is unsupported"):
    gguf_convert.convert(str(tmp_path / "a.gguf"), str(tmp_path / "out_a"))
  _write_gguf(str(tmp_path / "b.gguf"), ref, byte_bpe, tokenizer_model="llama")
  with pytest.raises(ConfigError, match=r"^gguf: tokenizer.ggml.model='llama' .* unsupported"):
    gguf_convert.convert(str(tmp_path / "b.gguf"), str(tmp_path / "out_b"))
  with pytest.raises(ConfigError, match="no such file"):
    gguf_convert.convert(str(tmp_path / "missing.gguf"), str(tmp_path / "out_c"))


def test_generate_from_an_imported_folder_matches_transformers_greedy(tmp_path, byte_bpe):
  """--mode=generate with init_from=hf:DIR and no checkpoint: the folder's model and tokenizer,
  greedy tokens equal to LlamaForCausalLM.generate (KV cache and GQA included)."""
  from experiments.config_files import load_config  # pylint: disable=g-import-not-at-top
  from gptjax.inference import generate  # pylint: disable=g-import-not-at-top
  ref = _llama(byte_bpe.get_vocab_size(), True)
  _write_gguf(str(tmp_path / "m.gguf"), ref, byte_bpe)
  out = tmp_path / "hf"
  gguf_convert.convert(str(tmp_path / "m.gguf"), str(out))
  config = load_config("gpt", "tiny", init_from=f"hf:{out}", **{"generate.max_new_tokens": 10,
                                                                 "generate.temperature": 0.0})
  config, params, tokenizer = generate.imported_for_inference(config)
  assert config.model.num_kv_heads == 2 and config.model.position == "rope"
  prompt = "The album was released in"
  settings = generate.decode.settings_from_config(config, tokenizer)
  text = generate.complete(config, params, tokenizer, [prompt], settings)[0]
  ids = byte_bpe.encode(prompt).ids
  with torch.no_grad():
    theirs = ref.generate(torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                          max_new_tokens=10, do_sample=False, pad_token_id=0)
  assert text == byte_bpe.decode(theirs[0, len(ids):].tolist())
