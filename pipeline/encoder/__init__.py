"""The transformer: model, collation and data module, Lightning training, embedding init."""
