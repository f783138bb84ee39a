"""A postal prescription service whose pharmacies watch a realtime list of pending orders.

- :mod:`examples.pharmacy.notifications` declares what is sent and how it is classified;
- :mod:`examples.pharmacy.db` holds the service's own tables;
- :mod:`examples.pharmacy.app` is the FastAPI app (orders, details by opaque id, Pusher auth);
- :mod:`examples.pharmacy.demo` runs everything end to end: ``python -m examples.pharmacy.demo``.
"""
