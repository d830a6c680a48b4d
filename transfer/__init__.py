"""Peer-to-peer transfer of expert weights and KV blocks between ranks (docs/design.md, section 8).

Glossary: an **arena** is one large registered region holding many tensors (a rank's expert
weights, or its KV blocks); a **manifest** (etcd ``manifests/<slot>``) says where each tensor
lies in a holder's arena and its checksum; a **holder** is a live rank that has published one;
a **plan** assigns every wanted tensor to a holder or else to the checkpoint on disk; the
**executor** runs a plan, verifies, and re-plans around holders that fail.

Modules: ``errors`` (typed errors), ``config`` (the one frozen config), ``checksum`` (batched
over many tensors, the batch kernel in ``eep.kernels.checksum``; torch reference),
``transport`` (what every transport speaks), ``engine`` (Mooncake Transfer Engine wrapper),
``ipc`` (intra-host CUDA IPC transport behind the same API), ``arena``, ``manifest``,
``planner`` (pure), ``executor``, ``checkpoint`` (safetensors fallback), ``kv`` (KV block
migration). The holder processes of the tests and of
``eep bench transfer`` are ``eep.tools.holder_proc``.
"""
