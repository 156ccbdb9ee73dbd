"""The model definition `register` logs with MLflow's "models from code".

MLflow stores this reviewed file (and the ``pipeline`` package as code) instead of a
pickled Python object, so loading a registered version runs only this code, never bytes
written by whoever last logged a model. The weights, tokenizer and calibrator travel as
plain artifacts (safetensors, JSON); :class:`pipeline.serving.NewsgroupsClassifier` loads
them in ``load_context``.
"""

import mlflow

from pipeline.serving import NewsgroupsClassifier

mlflow.models.set_model(NewsgroupsClassifier())
