"""What a served model is, as ListModels reports it: shared by the processes that serve models and the
one that routes calls to them."""

from dataclasses import dataclass

from embeddings.v1 import types_pb2 as pb


@dataclass(frozen=True)
class ModelCard:
    """What a loaded model is: reported by ListModels and named in every response."""

    id: str
    version: str
    dimension: int
    space: str
    input_kinds: tuple[int, ...]
    max_input_tokens: int = 0
    description: str = ""

    def to_proto(self) -> pb.ModelInfo:
        return pb.ModelInfo(
            id=self.id,
            version=self.version,
            dimension=self.dimension,
            space=self.space,
            input_kinds=list(self.input_kinds),
            max_input_tokens=self.max_input_tokens,
            description=self.description,
        )

    @classmethod
    def from_proto(cls, info: pb.ModelInfo) -> "ModelCard":
        return cls(
            id=info.id,
            version=info.version,
            dimension=info.dimension,
            space=info.space,
            input_kinds=tuple(info.input_kinds),
            max_input_tokens=info.max_input_tokens,
            description=info.description,
        )

    def ref(self) -> pb.ModelRef:
        return pb.ModelRef(id=self.id, version=self.version, space=self.space)
