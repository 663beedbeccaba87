"""Parameter-efficient fine-tuning: adapters as pytrees beside a frozen base."""

from jaxpost.peft.lora import LoraConfig, init_lora, lora_loss, lora_specs, merge_lora

__all__ = ["LoraConfig", "init_lora", "lora_loss", "lora_specs", "merge_lora"]
