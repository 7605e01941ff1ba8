"""T5 v1.0 (encoder-decoder, RMSNorm, relative position bias), trained by span corruption.

Usage: --config=configs/t5.py:small   (variants: tiny, small, base, large)
`base` is the published T5-small v1.0 with tied embeddings (60,506,624 parameters);
`large` is T5-base.
"""

from gptjax import config_schema

VARIANTS = {
    "tiny": dict(model=dict(vocab_size=512, embed_dim=64, num_heads=4, mlp_dim=256, num_layers=2,
                            max_len=64),
                 data=dict(seq_len=32, target_len=16, batch_size=8, eval_batch_size=8,
                           tokenizer=dict(vocab_size=512, num_sentinels=20)),
                 train=dict(steps=20, warmup_steps=5, log_every=5, eval_every=10, ckpt_every=10)),
    "small": dict(model=dict(vocab_size=8192, embed_dim=256, num_heads=4, mlp_dim=1024, num_layers=4,
                             max_len=256),
                  data=dict(seq_len=128, target_len=32, batch_size=16, tokenizer=dict(vocab_size=8192)),
                  train=dict(steps=600, learning_rate=2e-3, warmup_steps=60)),
    "base": dict(model=dict(vocab_size=32128, embed_dim=512, num_heads=8, mlp_dim=2048, num_layers=6,
                            max_len=512),
                 data=dict(seq_len=512, target_len=114, batch_size=16,
                           tokenizer=dict(vocab_size=32128)),
                 train=dict(learning_rate=1e-3)),
    "large": dict(model=dict(vocab_size=32128, embed_dim=768, num_heads=12, mlp_dim=3072,
                             num_layers=12, max_len=512),
                  data=dict(seq_len=512, target_len=114, batch_size=16,
                            tokenizer=dict(vocab_size=32128)),
                  train=dict(learning_rate=1e-3)),
}


def get_config(arg: str = "small"):
  """Returns the T5 config for variant `arg`."""
  c = config_schema.base_config()
  c.name = "t5"
  c.objective = "span_corruption"
  m = c.model
  m.family = "encoder_decoder"
  m.position = "relative"
  m.relative_buckets = 32
  m.relative_max_distance = 128
  m.norm = "rmsnorm"
  m.norm_eps = 1e-6
  m.norm_position = "pre"
  m.activation = "relu"
  m.use_bias = False
  m.scale_attention = False
  m.tie_embeddings = True
  m.scale_tied_logits = True
  m.init_std = 1.0
  m.dropout_rate = 0.1
  c.data.corpus = "wikitext2"
  c.data.tokenizer.kind = "unigram"
  return config_schema.apply_variant(c, VARIANTS, arg)
