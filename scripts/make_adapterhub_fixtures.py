"""Makes the AdapterHub parity fixtures (run through make_adapterhub_fixtures.sh, which sets up
the side environment with AdapterHub's `adapters` library and the transformers it pins).

For a tiny random Llama and GPT-2 it saves, under tests/fixtures/adapterhub/<arch>/:
  base/                     the base model (config.json + model.safetensors)
  <adapter>/                adapter_config.json + adapter.safetensors, as save_adapter writes
                            them (the prediction-head file it adds is removed: not an adapter)
  expected.safetensors      input_ids, and per adapter the logits AdapterHub computes in
                            float32 ("<adapter>.float32") and float64 ("<adapter>.float64")
Adapter weights are drawn larger than AdapterHub's "bert" init (N(0, 0.02)) so that every
adapter visibly moves the logits.
"""

from __future__ import annotations

import argparse
import os
import shutil

import adapters
import torch
import transformers
from adapters import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from safetensors.torch import save_file

ADAPTERS = {
    "llama": {
        "seq_bn": SeqBnConfig(reduction_factor=4, leave_out=[1]),
        "double_seq_bn": DoubleSeqBnConfig(reduction_factor=4),
        "par_bn": ParBnConfig(reduction_factor=2),
        "seq_bn_gelu": SeqBnConfig(reduction_factor=8, non_linearity="gelu", scaling=0.5),
    },
    "gpt2": {
        "seq_bn": SeqBnConfig(reduction_factor=4, non_linearity="tanh"),
        "double_seq_bn": DoubleSeqBnConfig(reduction_factor=8, non_linearity="gelu_new"),
        "par_bn": ParBnConfig(reduction_factor=2, non_linearity="swish"),
    },
}


def tiny_model(arch: str) -> transformers.PreTrainedModel:
    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            max_position_embeddings=64,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/adapterhub")
    args = parser.parse_args()
    assert isinstance(BnConfig, type)
    for arch, configs in ADAPTERS.items():
        torch.manual_seed(0)
        folder = os.path.join(args.out, arch)
        shutil.rmtree(folder, ignore_errors=True)
        model = tiny_model(arch).eval()
        model.save_pretrained(os.path.join(folder, "base"), safe_serialization=True)
        adapters.init(model)
        input_ids = torch.randint(0, model.config.vocab_size, (2, 7))
        expected = {"input_ids": input_ids}
        for name, config in configs.items():
            model.add_adapter(name, config=config)
            with torch.no_grad():
                for key, parameter in model.named_parameters():
                    if f".{name}." in key:
                        parameter.normal_(0.0, 0.3)
            model.save_adapter(os.path.join(folder, name), name, use_safetensors=True)
            for stray in os.listdir(os.path.join(folder, name)):
                if stray not in ("adapter_config.json", "adapter.safetensors"):
                    os.remove(os.path.join(folder, name, stray))
            model.set_active_adapters(name)
            for dtype, label in ((torch.float32, "float32"), (torch.float64, "float64")):
                model.to(dtype)
                with torch.no_grad():
                    expected[f"{name}.{label}"] = model(input_ids).logits.float().contiguous()
            model.to(torch.float32)
            model.set_active_adapters(None)
        with torch.no_grad():
            expected["base.float32"] = model(input_ids).logits.contiguous()
        save_file(expected, os.path.join(folder, "expected.safetensors"))
        print(f"{folder}: {', '.join(configs)}")


if __name__ == "__main__":
    main()
