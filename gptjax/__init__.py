"""gptjax: BERT, T5/BART and GPT from one set of Flax layers."""

from gptjax.backends.xla_cpu import host_memory as _host_memory

_host_memory.configure()
