"""Jobs: the persisted record of every fine-tune, its queue and the worker that runs it."""
