"""What an op declares for the ahead-of-time check (``avpt_kernels.aot``): one ``KernelConfig`` per
kernel configuration its launchers can select, its signature read from the kernel's own parameter
list (``signature``). A leaf module: the op packages import it, ``aot`` imports them (through the
registry ``avpt_kernels.ops.OPS``), and nothing here imports an op."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One compilable configuration: ``signature`` maps every argument name to a triton type
    ("*fp32", "i32", "fp32", ... or "constexpr"); ``constexprs`` gives the constexpr values."""
    fn: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: Optional[int] = None  # the launch's register cap (PTX .maxnreg), if it sets one
    # the compile targets ("sm_80", "sm_90a") whose launchers select it; None: every target
    targets: Optional[Tuple[str, ...]] = None
    # The launch-time specialization: a launch tells the compiler which pointer and int
    # arguments are multiples of 16 (``tt.divisibility``: vectorized loads, pipelined copies)
    # and turns an int argument equal to 1 into a constant. ``divisible`` names the parameters
    # compiled with that hint, ``ones`` those compiled as the constant 1; both empty: the generic
    # compile (no hint), the one an unaligned shape gets.
    divisible: Tuple[str, ...] = ()
    ones: Tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        """"aligned" (compiled with launch-time hints) or "generic"."""
        return "aligned" if self.divisible or self.ones else "generic"

    @property
    def kernel(self) -> str:
        return getattr(self.fn, "__name__", None) or self.fn.fn.__name__

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.constexprs.items())]
        extra = [f"maxnreg={self.maxnreg}"] if self.maxnreg else []
        if self.spec == "aligned":
            extra.append("spec=aligned")
        return ",".join(parts + [f"num_warps={self.num_warps}", f"num_stages={self.num_stages}"]
                        + extra)

    def compile_inputs(self) -> Tuple[Dict[str, str], Dict[Any, Any], Dict[tuple, list]]:
        """(signature, constexprs, attrs) for ``triton.compiler.ASTSource``: ``ones`` become
        constexprs equal to 1, ``divisible`` parameters get ``tt.divisibility`` 16 (what a launch
        with such arguments compiles)."""
        signature = dict(self.signature)
        constexprs = dict(self.constexprs)
        for name in self.ones:
            signature[name] = "constexpr"
            constexprs[name] = 1
        index = {name: i for i, (name, _) in enumerate(parameters(self.fn))}
        attrs = {(index[name],): [["tt.divisibility", 16]] for name in self.divisible}
        return signature, constexprs, attrs


def aligned(cfg: KernelConfig, odd: Sequence[str], ones: Sequence[str] = ()) -> KernelConfig:
    """``cfg`` as a launch at the model's shape compiles it: divisibility hints on every pointer
    and int parameter but those in ``odd`` (sizes that are no multiple of 16 there), the int
    parameters in ``ones`` (equal to 1 there: unit strides, flags) compiled as the constant 1.
    ``make aot`` checks both compiles: the generic one is what an unaligned shape gets, this one
    what the model's shape gets (the hints enable vectorized loads and pipelined copies: other
    registers, more shared memory); the kernel model costs a launch by the compile it gets
    (``benchmarks/kernel_model.py`` checks the launches against ``odd`` and ``ones``)."""
    ones = tuple(n for n in ones if n in cfg.signature)
    hinted = tuple(n for n, t in cfg.signature.items()
                   if (t.startswith("*") or t == "i32") and n not in odd and n not in ones)
    return dataclasses.replace(cfg, divisible=hinted, ones=ones)


def with_aligned(configs: Sequence[KernelConfig], odd: Sequence[str],
                 ones: Sequence[str] = ()) -> List[KernelConfig]:
    """Each configuration followed by its ``aligned`` twin."""
    return [c for cfg in configs for c in (cfg, aligned(cfg, odd, ones))]


def parameters(fn) -> List[tuple]:
    """(name, is_constexpr) of each parameter of kernel ``fn``, in order: from the jitted
    function's own record, or (under TRITON_INTERPRET=1, where ``@triton.jit`` gives an
    interpreted function) from the Python signature's ``tl.constexpr`` annotations."""
    if hasattr(fn, "params"):
        return [(p.name, bool(p.is_constexpr)) for p in fn.params]
    import inspect

    params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
    return [(p.name, "constexpr" in str(p.annotation)) for p in params]


def signature(fn, pointers: Optional[Dict[str, str]] = None, floats: Sequence[str] = (),
              pointer: str = "*fp32") -> Dict[str, str]:
    """The compile signature of kernel ``fn`` read from its own parameter list, so that the AOT
    list cannot drift from the kernel: constexpr parameters -> "constexpr"; ``*_ptr`` parameters
    -> ``pointers[name]`` where given, else ``pointer``; parameters named in ``floats`` -> "fp32";
    every other one (sizes, strides, flags) -> "i32". Names the kernel lacks are ignored (one
    table serves all of an op's kernels)."""
    pointers = dict(pointers or {})
    sig = {}
    for name, is_constexpr in parameters(fn):
        if is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, pointer)
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def tl_type(dtype) -> str:
    """Triton's name of a torch floating dtype ("fp32", "fp16", "bf16")."""
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
