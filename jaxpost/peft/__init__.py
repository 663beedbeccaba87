"""Parameter-efficient fine-tuning: adapters as pytrees beside a frozen base."""

from jaxpost.peft.lora import LoraConfig, init_lora, lora_loss, lora_specs, merge_lora
from jaxpost.peft.peft_format import load_peft_adapter, save_peft_adapter

__all__ = ["LoraConfig", "init_lora", "load_peft_adapter", "lora_loss", "lora_specs",
           "merge_lora", "save_peft_adapter"]
