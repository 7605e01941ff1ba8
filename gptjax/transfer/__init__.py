"""Fine-tuning (what trains, LoRA, SFT data), Hugging Face import and int8 weights."""
