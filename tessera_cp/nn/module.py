"""Module, Parameter, Buffer and the containers: the state a model carries, named, moved and saved together."""
import collections

from .. import dtypes
from ..errors import DTypeError, ShapeError, TesseraError
from ..tensor import Tensor, tensor


class Parameter(Tensor):
    """A Tensor that a Module trains: requires grad unless told otherwise."""

    def __init__(self, data, requires_grad=True):
        data = data if isinstance(data, Tensor) else tensor(data)
        super().__init__(data.data, data.dtype, requires_grad=requires_grad and data.dtype.is_floating)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


class Buffer(Tensor):
    """A Tensor a Module keeps but does not train (a rope cache, running statistics); ``persistent`` ones are saved."""

    def __init__(self, data, persistent=True):
        data = data if isinstance(data, Tensor) else tensor(data)
        super().__init__(data.data, data.dtype)
        self.persistent = persistent


class Module:
    """Base class: assign Parameters, Buffers and Modules as attributes and write ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", collections.OrderedDict())
        object.__setattr__(self, "_buffers", collections.OrderedDict())
        object.__setattr__(self, "_modules", collections.OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise TesseraError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning {name}")
        for registry in (self._parameters, self._buffers, self._modules):
            registry.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Buffer):
            self._buffers[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)
            return
        self.__dict__.pop(name, None)

    def __getattr__(self, name):
        for registry in ("_parameters", "_buffers", "_modules"):
            found = self.__dict__.get(registry, {})
            if name in found:
                return found[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name):
        for registry in (self._parameters, self._buffers, self._modules):
            if name in registry:
                del registry[name]
                return
        object.__delattr__(self, name)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------- traversal
    def named_modules(self, prefix=""):
        """(name, module) for this module and every submodule, depth first, each module once."""
        seen, stack = set(), [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = list(module._modules.items())
            for child_name, child in reversed(children):
                stack.append((f"{name}.{child_name}" if name else child_name, child))

    def modules(self):
        return (m for _, m in self.named_modules())

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self, prefix="", recurse=True):
        seen = set()
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for module_name, module in modules:
            for name, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{module_name}.{name}" if module_name else name), p

    def parameters(self, recurse=True):
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_buffers(self, prefix=""):
        for module_name, module in self.named_modules(prefix):
            for name, b in module._buffers.items():
                yield (f"{module_name}.{name}" if module_name else name), b

    # ------------------------------------------------------------- modes and state
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def apply(self, fn):
        for m in self.modules():
            fn(m)
        return self

    def _tensors(self):
        for m in self.modules():
            for registry in (m._parameters, m._buffers):
                yield from registry.values()

    def to(self, target):
        """Move every parameter and buffer to a device ('cpu'/'cuda') or cast floating ones to a dtype, in place."""
        for t in self._tensors():
            if isinstance(target, dtypes.DType) or (isinstance(target, str) and target not in ("cpu", "cuda")
                                                     and not target.startswith("cuda")):
                if not t.dtype.is_floating or t.dtype.is_fp8:  # quantized storage keeps its format
                    continue
                new = t.detach().astype(target)
            else:
                new = t.detach().to(target)
            t.data, t.dtype = new.data, new.dtype
            t.grad = None
        return self

    def cuda(self):
        return self.to("cuda")

    def cpu(self):
        return self.to("cpu")

    def bfloat16(self):
        return self.to(dtypes.bf16)

    def float(self):
        return self.to(dtypes.f32)

    def state_dict(self):
        """Parameters and persistent buffers by dotted name (the tensors themselves, not copies)."""
        state = collections.OrderedDict(self.named_parameters())
        state.update((n, b) for n, b in self.named_buffers() if b.persistent)
        return state

    def load_state_dict(self, state, strict=True):
        """Copy tensors into the parameters and buffers of the same names; shapes and dtypes must match."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise TesseraError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, target in own.items():
            if name not in state:
                continue
            value = state[name]
            value = value if isinstance(value, Tensor) else tensor(value)
            if value.shape != target.shape:
                raise ShapeError(f"load_state_dict: {name!r} has shape {value.shape}, the module expects {target.shape}")
            if value.dtype is not target.dtype:
                raise DTypeError(f"load_state_dict: {name!r} has dtype {value.dtype.name}, the module expects "
                                 f"{target.dtype.name}")
            target.data = value.detach().to(target.device).data.copy()
        return missing, unexpected

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    def extra_repr(self):
        return ""


class ModuleList(Module):
    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        if not isinstance(module, Module):
            raise TesseraError(f"ModuleList holds Modules, got {type(module).__name__}")
        self._modules[str(len(self._modules))] = module
        return self

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(ModuleList):
    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x
