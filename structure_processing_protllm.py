"""ProtLLMStructureProcessor: the ProtLLM processor of a model that reads structures.

A model folder carries this module, and the structure reader it imports (`structure_protllm.py`,
`structure_files_protllm.py`, `saprot_protllm.py`), only when its model reads structures: SEPIT's structure bias
(`use_structure_bias`), SaProt input (`protein_encoder_input="saprot"`: amino acid + Foldseek 3Di tokens) or an
ESM3 encoder (VQ-VAE structure tokens from backbone coordinates). Its processor_config.json `auto_map` then names
this class; a sequence model's folder names `processing_protllm.ProtLLMProcessor` and carries none of these files.
"""

from dataclasses import fields

try:
    from .processing_protllm import ProteinInputError, ProtLLMProcessor
    from .saprot_protllm import saprot_sequence, three_di_tokens
    from .structure_protllm import ProteinStructure, StructureError, load_structure
except ImportError:  # loaded as a top-level module (repository checkout, not remote code)
    from processing_protllm import ProteinInputError, ProtLLMProcessor
    from saprot_protllm import saprot_sequence, three_di_tokens
    from structure_protllm import ProteinStructure, StructureError, load_structure


class ProtLLMStructureProcessor(ProtLLMProcessor):
    r"""
    `ProtLLMProcessor` that also reads structures: a protein's `structure` may be a PDB / mmCIF / BinaryCIF file
    (path, optionally gzipped), its bytes or text, a parsed `ProteinStructure`, or a coordinate dict
    (`structure_protllm.load_structure`); with `protein_encoder_input="saprot"` proteins become SaProt tokens
    (amino acid + 3Di). Outputs `protein_coords` `(P, R, 4, 3)` and `protein_coord_mask` `(P, R)` when any protein
    has a structure. Arguments as `ProtLLMProcessor`.
    """

    protein_encoder_inputs = ("sequence", "saprot")
    reads_structures = True

    def _load_structure(self, source, chain, sequence, protein_index):
        if not isinstance(source, ProteinStructure) and hasattr(source, "sequence") and hasattr(source, "coords"):
            # parsed by another copy of structure_protllm (the repository's, next to this folder's): same fields
            source = ProteinStructure(**{field.name: getattr(source, field.name, None) for field in fields(ProteinStructure)})
        try:
            return load_structure(source, chain=chain, sequence=sequence)
        except StructureError as error:
            raise ProteinInputError(f"protein {protein_index}: {error}") from error

    def _saprot_tokens(self, sequence, structure) -> str:
        if structure is None:
            # via saprot_sequence so X/B/Z/U/O become "#" as with a structure ("X#" is not a SaProt token: <unk>)
            return saprot_sequence(sequence, "#" * len(sequence))
        return saprot_sequence(sequence, three_di_tokens(structure), structure.plddt, self.plddt_threshold)


__all__ = ["ProtLLMStructureProcessor"]
