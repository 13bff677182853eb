"""The Modelfile of a run trained on an Ollama model: the base's own TEMPLATE, parameters and
SYSTEM, `num_ctx` at least the training length, and either `FROM <the base model>` +
`ADAPTER ./adapter.gguf` (the daemon shares the base's blob) or `FROM ./model-<quant>.gguf`
(merged, for daemons that no longer create adapter models, or with --merged)."""

from __future__ import annotations

from ollama_ft.ollama.modelfile import LIST_PARAMETERS, Modelfile
from ollama_ft.ollama_base.chat import is_jinja
from ollama_ft.run import ADAPTER_GGUF, gguf_name


def build(ob, *, max_len: int | None, merged: bool, system: str | None = None,
          overrides=None) -> Modelfile:
    from ollama_ft.ollama.templates import _override_pairs, num_ctx_for

    params = [(k, v) for k, v in ob.parameters]
    current = [int(v) for k, v in params if k == "num_ctx" and str(v).isdigit()]
    num_ctx = num_ctx_for(max_len, ob.context_length)
    if num_ctx and (not current or current[-1] < num_ctx):
        params = [(k, v) for k, v in params if k != "num_ctx"] + [("num_ctx", str(num_ctx))]
    for name, value in _override_pairs(overrides):
        if name in LIST_PARAMETERS:
            if (name, value) not in params:
                params.append((name, value))
        elif any(k == name for k, _ in params):
            params = [(k, value if k == name else v) for k, v in params]
        else:
            params.append((name, value))
    system = system if system is not None else (ob.system or None)
    # a daemon serving the GGUF's own Jinja template shows that one: it is no Go TEMPLATE to
    # send back; the new model is served the same way (FROM the base inherits its TEMPLATE, and
    # the merged GGUF carries the same chat template)
    template = None if is_jinja(ob.template) else ob.template
    if merged:
        return Modelfile(from_="./" + gguf_name(ob.quant), template=template, system=system,
                         parameters=params)
    return Modelfile(from_=ob.name, adapter="./" + ADAPTER_GGUF, template=template, system=system,
                     parameters=params)
