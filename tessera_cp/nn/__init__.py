"""tessera_cp.nn: Modules and the ops they are built from, by family (one file each)."""
from . import init
from .layers import Dropout, Embedding, Linear, dropout, embedding, linear
from .module import Buffer, Module, ModuleList, Parameter, Sequential
from .serialization import load_safetensors, save_safetensors
