"""Running ODEdit at scale: a user's dataset edited record by record (``edit_runner``), sharded
over the processes torchrun starts (``distributed`` sets each one up, ``shards`` decides which
records it edits and merges what they wrote), and EasyEdit's meta-training with its gradients
averaged over those processes (``training``). ``docs/scaling.md`` shows the commands."""
