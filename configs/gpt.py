"""GPT (decoder-only, pre-LN, tied LM head), trained by next-token prediction.

Usage: --config=configs/gpt.py:small   (variants: tiny, small, base, large)
`base` is GPT-2 small (124,439,808 parameters); `large` is GPT-2 medium.
"""

from gptjax import config_schema

VARIANTS = {
    # tests: compiles in seconds
    "tiny": dict(model=dict(vocab_size=512, embed_dim=64, num_heads=4, mlp_dim=256, num_layers=2,
                            max_len=64),
                 data=dict(seq_len=32, batch_size=8, eval_batch_size=8, tokenizer=dict(vocab_size=512)),
                 train=dict(steps=20, warmup_steps=5, log_every=5, eval_every=10, ckpt_every=10)),
    # trains usefully in minutes on 2 CPU cores
    "small": dict(model=dict(vocab_size=8192, embed_dim=256, num_heads=4, mlp_dim=1024, num_layers=6,
                             max_len=256),
                  data=dict(seq_len=128, batch_size=16, tokenizer=dict(vocab_size=8192)),
                  train=dict(steps=600, learning_rate=2e-3, warmup_steps=60, eval_every=200,
                             ckpt_every=200)),
    # GPT-2 small, exactly
    "base": dict(model=dict(vocab_size=50257, embed_dim=768, num_heads=12, mlp_dim=3072, num_layers=12,
                            max_len=1024),
                 data=dict(seq_len=1024, batch_size=8, tokenizer=dict(vocab_size=50257)),
                 train=dict(learning_rate=6e-4)),
    # GPT-2 medium
    "large": dict(model=dict(vocab_size=50257, embed_dim=1024, num_heads=16, mlp_dim=4096,
                             num_layers=24, max_len=1024),
                  data=dict(seq_len=1024, batch_size=8, tokenizer=dict(vocab_size=50257)),
                  train=dict(learning_rate=3e-4)),
}


def get_config(arg: str = "small"):
  """Returns the GPT config for variant `arg`."""
  c = config_schema.base_config()
  c.name = "gpt"
  c.objective = "next_token"
  c.model.family = "decoder_only"
  c.model.position = "learned"
  c.model.norm = "layernorm"
  c.model.norm_position = "pre"
  c.model.activation = "gelu"  # GPT-2's tanh approximation
  c.data.corpus = "tiny_shakespeare"
  c.data.tokenizer.kind = "bpe"
  return config_schema.apply_variant(c, VARIANTS, arg)
