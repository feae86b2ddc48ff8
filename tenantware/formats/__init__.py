"""Wire formats at the edges: one module per API, translation only where formats differ.

Every layer works on one view of a request (``context.RequestView``) and one usage record
(``context.Usage``) whichever format it came in; these modules translate at the inbound
route (errors in the client's shape: ``errors.send_error``) and at the upstream
(``adapter.adapter_for``).
"""
