"""BART (encoder-decoder, post-LN, learned positions with offset 2), trained by denoising.

Usage: --config=configs/bart.py:small   (variants: tiny, small, base, large)
`base` is BART-base (139,420,416 parameters); `large` is BART-large.
"""

from gptjax import config_schema

VARIANTS = {
    "tiny": dict(model=dict(vocab_size=512, embed_dim=64, num_heads=4, mlp_dim=256, num_layers=2,
                            max_len=64),
                 data=dict(seq_len=32, target_len=32, batch_size=8, eval_batch_size=8,
                           tokenizer=dict(vocab_size=512)),
                 train=dict(steps=20, warmup_steps=5, log_every=5, eval_every=10, ckpt_every=10)),
    "small": dict(model=dict(vocab_size=8192, embed_dim=256, num_heads=4, mlp_dim=1024, num_layers=3,
                             max_len=256),
                  data=dict(seq_len=128, target_len=128, batch_size=16,
                            tokenizer=dict(vocab_size=8192)),
                  train=dict(steps=600, learning_rate=1e-3, warmup_steps=60)),
    "base": dict(model=dict(vocab_size=50265, embed_dim=768, num_heads=12, mlp_dim=3072, num_layers=6,
                            max_len=1024),
                 data=dict(seq_len=512, target_len=512, batch_size=16,
                           tokenizer=dict(vocab_size=50265)),
                 train=dict(learning_rate=4e-4)),
    "large": dict(model=dict(vocab_size=50265, embed_dim=1024, num_heads=16, mlp_dim=4096,
                             num_layers=12, max_len=1024),
                  data=dict(seq_len=512, target_len=512, batch_size=16,
                            tokenizer=dict(vocab_size=50265)),
                  train=dict(learning_rate=4e-4)),
}


def get_config(arg: str = "small"):
  """Returns the BART config for variant `arg`."""
  c = config_schema.base_config()
  c.name = "bart"
  c.objective = "denoise"
  m = c.model
  m.family = "encoder_decoder"
  m.position = "learned"
  m.position_offset = 2
  m.norm = "layernorm"
  m.norm_position = "post"
  m.final_norm = False
  m.embed_norm = True
  m.activation = "gelu_exact"
  m.dropout_rate = 0.1
  c.data.corpus = "wikitext2"
  c.data.tokenizer.kind = "bpe"
  return config_schema.apply_variant(c, VARIANTS, arg)
