"""`run.py --mode=summary`: the per-module parameter table of a config, nothing allocated."""

from gptjax.analysis import param_summary as summary
from gptjax.model.config import ModelConfig


def main(config, workdir, flag_values) -> None:
  """Prints the parameter table of `config.model`, ending with `total params: N`."""
  del workdir, flag_values
  cfg = ModelConfig.from_config(config.model)
  tree = summary.param_shapes(cfg)
  print(f"{config.name}:{config.variant}  family={cfg.family}  layers={cfg.num_layers}  "
        f"embed={cfg.embed_dim}  heads={cfg.num_heads}  mlp={cfg.mlp_dim}  vocab={cfg.vocab_size}")
  print(summary.format_table(summary.module_table(tree), summary.count_params(tree)))
