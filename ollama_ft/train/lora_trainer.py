"""The Trainer ollama-ft trains with: the stock transformers Trainer with the loss computed
where the labels are (train/loss.py)."""

from __future__ import annotations

from transformers import Trainer

from ollama_ft.train.loss import selective_lm_loss


class LoRATrainer(Trainer):
    """The stock Trainer; only the loss is computed where the labels are (train/loss.py),
    and packed batches report their real token count."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.model_accepts_loss_kwargs = True  # count label tokens across accumulation
        self.loss_is_scaled_for_ga = True  # our loss divides by that count itself

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        real = inputs.pop("num_real_tokens", None)
        if real is not None and model.training:
            total = self.accelerator.gather(real.reshape(1).to(self.args.device)).sum()
            self.state.num_input_tokens_seen += int(total)
        loss = selective_lm_loss(model, inputs, num_items_in_batch)
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1):
            loss = loss * self.accelerator.num_processes  # the count is global
        return (loss, {"loss": loss}) if return_outputs else loss
