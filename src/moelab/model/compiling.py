"""torch.compile behind one-line errors: used for compiled routing (model) and compiled blocks (train).

A backend that cannot build (no C++ toolchain, an op whose fake kernel refuses the dtype) surfaces as a
dynamo exception with a long traceback; here it becomes a MoelabError that names the option to turn off.
"""

from __future__ import annotations

import functools
import logging

import torch

from moelab.config import MoelabError


def compile_supported() -> str | None:
    """None when torch.compile can run here, else why not (one line)."""
    try:
        import torch._dynamo as dynamo
    except Exception as e:  # a torch build without dynamo
        return f"torch.compile is unavailable ({type(e).__name__})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python/torch build"
    return None


def compiled(fn, backend: str, key: str, on: str, off: str, **compile_kwargs):
    """`fn` compiled; a failure to compile raises one line naming the setting `key=on` and `key=off`."""
    from moelab.model.experts import mark_probes_for_compile

    mark_probes_for_compile()
    compiled_fn = torch.compile(fn, backend=backend, **compile_kwargs)
    # Dynamo logs a failing fake-tensor call as a traceback before raising; the one line below says it.
    quiet = logging.getLogger("torch._subclasses.fake_tensor")

    @functools.wraps(fn)
    def run(*args, **kwargs):
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            return compiled_fn(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:  # BackendCompilerFailed, Unsupported, ...
            raise MoelabError(f"{key}={on}: torch.compile failed on this machine ({root_cause(e)}); "
                              f"set {key}={off}") from None
        finally:
            quiet.setLevel(level)
    return run


def root_cause(e: BaseException) -> str:
    """The innermost exception's first line: the reason, not dynamo's wrapper."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
