"""Parameter-efficient fine-tuning: adapters as pytrees beside a frozen base."""

from jaxpost.peft.lora import (LoraConfig, LoraWeight, attach_lora, init_lora, lora_loss,
                               lora_specs, merge_lora)
from jaxpost.peft.quant import (QuantizedWeight, dequantize, dequantize_params, quantize,
                                quantize_params)
from jaxpost.peft.peft_format import load_peft_adapter, save_peft_adapter

__all__ = ["LoraConfig", "LoraWeight", "QuantizedWeight", "attach_lora", "dequantize",
           "dequantize_params", "init_lora", "load_peft_adapter", "lora_loss", "lora_specs",
           "merge_lora", "quantize", "quantize_params", "save_peft_adapter"]
