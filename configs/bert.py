"""BERT (encoder-only, post-LN), trained by masked LM plus next-sentence prediction.

Usage: --config=configs/bert.py:small   (variants: tiny, small, base, large)
`base` is BERT-base with pooler, MLM and NSP heads (110,106,428 parameters).
"""

from gptjax import config_schema

VARIANTS = {
    "tiny": dict(model=dict(vocab_size=512, embed_dim=64, num_heads=4, mlp_dim=256, num_layers=2,
                            max_len=64),
                 data=dict(seq_len=32, batch_size=8, eval_batch_size=8, tokenizer=dict(vocab_size=512)),
                 train=dict(steps=20, warmup_steps=5, log_every=5, eval_every=10, ckpt_every=10)),
    "small": dict(model=dict(vocab_size=8192, embed_dim=256, num_heads=4, mlp_dim=1024, num_layers=6,
                             max_len=256),
                  data=dict(seq_len=128, batch_size=16, tokenizer=dict(vocab_size=8192)),
                  train=dict(steps=600, learning_rate=1e-3, warmup_steps=60)),
    "base": dict(model=dict(vocab_size=30522, embed_dim=768, num_heads=12, mlp_dim=3072, num_layers=12,
                            max_len=512),
                 data=dict(seq_len=128, batch_size=32, tokenizer=dict(vocab_size=30522)),
                 train=dict(learning_rate=1e-4, weight_decay=0.01, b2=0.999)),
    "large": dict(model=dict(vocab_size=30522, embed_dim=1024, num_heads=16, mlp_dim=4096,
                             num_layers=24, max_len=512),
                  data=dict(seq_len=128, batch_size=32, tokenizer=dict(vocab_size=30522)),
                  train=dict(learning_rate=1e-4, weight_decay=0.01, b2=0.999)),
}


def get_config(arg: str = "small"):
  """Returns the BERT config for variant `arg`."""
  c = config_schema.base_config()
  c.name = "bert"
  c.objective = "mlm_nsp"
  m = c.model
  m.family = "encoder_only"
  m.position = "learned"
  m.norm = "layernorm"
  m.norm_eps = 1e-12
  m.norm_position = "post"
  m.final_norm = False
  m.embed_norm = True
  m.activation = "gelu_exact"
  m.type_vocab_size = 2
  m.mlm_head = True
  m.nsp_head = True
  m.dropout_rate = 0.1
  m.attention_dropout_rate = 0.1
  c.data.corpus = "wikitext2"
  c.data.tokenizer.kind = "wordpiece"
  return config_schema.apply_variant(c, VARIANTS, arg)
