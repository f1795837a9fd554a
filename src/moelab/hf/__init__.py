"""Hugging Face transformers interop: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints both ways, dots1
and GLM-4 MoE (DeepSeek-V3 router) into moelab; weight analyses and traces of any MoE family.

- `moelab.hf.convert.import_hf(path_or_name, out)`: a transformers checkpoint -> a moelab checkpoint folder.
- `moelab.hf.convert.export_hf(checkpoint, out, family=None)`: a moelab checkpoint -> a transformers folder.
- `moelab.hf.weights.hf_weight_layers(path)`: router and expert weights for `analysis.weights` (any family
  whose experts are stored as matrices, stacked or per expert).
- `moelab.hf.model_class.model_class(folder, config)`: the class a folder is loaded as (its causal LM, else
  the head class config.json names, else the base model).
- `moelab.trace.hf.trace_hf(...)`: a routing trace of a transformers model over a moelab corpus.
Conversions need only safetensors; loading or tracing a transformers model needs `transformers`.
"""
