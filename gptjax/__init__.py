"""gptjax: BERT, T5/BART and GPT from one set of Flax layers."""
