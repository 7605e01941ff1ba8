"""What a batch holds for each objective: the contract between pipelines and losses.

Every batch is a dict of NumPy arrays with a leading batch axis B. Token arrays
are int32 [B, L]; `weights` arrays are float32 and say which positions carry
loss (0 for padding and for padded eval examples). Keys per objective:

next_token       inputs, targets, weights, segment_ids, positions
                 (segment_ids: 1, 2, ... per packed document, 0 = padding;
                 positions restart at 0 in each packed document)
prefix_lm        inputs, targets, weights (suffix only), prefix_mask (1 on the
                 prefix, which every position may attend to), input_mask
mlm              inputs (corrupted), targets (original ids), weights (1 on the
                 chosen 15%), input_mask, token_type_ids
nsp / sop        inputs, input_mask, token_type_ids, pair_labels [B]
                 (nsp: 1 = B really follows A; sop: 1 = A, B in original order),
                 pair_weights [B] (0 for padded eval examples)
mlm_nsp          the union of mlm and nsp keys
span_corruption  enc_inputs, enc_mask, dec_inputs, dec_targets, dec_weights
denoise          enc_inputs, enc_mask, dec_inputs, dec_targets, dec_weights
instruction      inputs, targets, weights (response tokens and EOS only), input_mask
                 (causal LM on `config.finetune.prompt_template` + response)
dpo              prompt_inputs, prompt_mask (the prompt alone, [B, L]); chosen_inputs,
                 chosen_targets, chosen_weights (response tokens and EOS only), chosen_mask and
                 the same four rejected_*; decoder-only: prompt + response, [B, L];
                 encoder-decoder: the decoder side, [B, T], prompt in the encoder;
                 ref_chosen_logp, ref_rejected_logp [B] (the reference's sequence log-probs),
                 pair_weights [B] (0 for padded eval examples)
classification   inputs, input_mask, token_type_ids, labels [B], label_weights [B]
                 (encoder-decoder models read the same keys through the encoder)
"""

from gptjax.config_error import ConfigError

TOKEN_KEYS = {
    "next_token": ("inputs", "targets", "weights", "segment_ids", "positions"),
    "prefix_lm": ("inputs", "targets", "weights", "prefix_mask", "input_mask"),
    "mlm": ("inputs", "targets", "weights", "input_mask", "token_type_ids"),
    "nsp": ("inputs", "input_mask", "token_type_ids", "pair_labels", "pair_weights"),
    "sop": ("inputs", "input_mask", "token_type_ids", "pair_labels", "pair_weights"),
    "mlm_nsp": ("inputs", "targets", "weights", "input_mask", "token_type_ids", "pair_labels",
                "pair_weights"),
    "span_corruption": ("enc_inputs", "enc_mask", "dec_inputs", "dec_targets", "dec_weights"),
    "denoise": ("enc_inputs", "enc_mask", "dec_inputs", "dec_targets", "dec_weights"),
    "classification": ("inputs", "input_mask", "token_type_ids", "labels", "label_weights"),
    "instruction": ("inputs", "targets", "weights", "input_mask"),
    "dpo": ("prompt_inputs", "prompt_mask", "chosen_inputs", "chosen_targets", "chosen_weights",
            "chosen_mask", "rejected_inputs", "rejected_targets", "rejected_weights",
            "rejected_mask", "ref_chosen_logp", "ref_rejected_logp", "pair_weights"),
}


def check_family_objective(family: str, objective: str) -> None:
  """Raises ConfigError in one line when `family` cannot train `objective`.

  Each family's objectives are declared by its adapter (gptjax/model/family.py).
  """
  from gptjax.model import family as model_family  # pylint: disable=g-import-not-at-top
  if objective not in TOKEN_KEYS:
    raise ConfigError(f"config.objective={objective!r} is unknown; allowed: {', '.join(TOKEN_KEYS)}")
  allowed = model_family.get(family).objectives
  if objective not in allowed:
    raise ConfigError(
        f"config.objective={objective!r} cannot train config.model.family={family!r}; "
        f"that family supports: {', '.join(allowed)}")
