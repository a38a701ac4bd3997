"""From the user's data to reduced vectors: batching (:mod:`.data`), passes of the model
(:mod:`.passes`) and reducers (:mod:`.reduction`)."""
