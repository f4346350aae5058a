"""Celery workers: the app and its configuration, one thin task per use case, and the per-GPU launcher.

Nothing here touches CUDA or imports torch at import time: each worker process is started with
CUDA_VISIBLE_DEVICES already set, and models load inside tasks (once per process).
"""
