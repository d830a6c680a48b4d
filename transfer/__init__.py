"""Peer-to-peer transfer of expert weights and KV blocks between ranks (docs/design.md, section 8).

Glossary: an **arena** is one large registered region holding many tensors (a rank's expert
weights, or its KV blocks); a **manifest** (etcd ``manifests/<slot>``) says where each tensor
lies in a holder's arena and its checksum; a **source** is a live holder of a tensor (a rank's
device arena, or a host-memory backup); a **plan** assigns every wanted tensor to a source, the
backup or the checkpoint on disk; the **executor** runs a plan, verifies, and re-plans around
sources that fail.

Modules: ``errors`` (typed errors), ``config`` (the one frozen config), ``checksum`` (device
checksum kernel + torch reference), ``engine`` (Mooncake Transfer Engine wrapper), ``ipc``
(intra-host CUDA IPC transport behind the same API), ``arena``, ``manifest``, ``planner``
(pure), ``executor``, ``checkpoint`` (safetensors fallback), ``kv`` (KV block migration),
``source`` (a process that serves an arena, for tests and benchmarks).
"""
