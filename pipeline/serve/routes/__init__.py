"""The API's routers by concern: query (classify/search/explain), items (add/get/delete/relabel),
maintenance (compact/prune/interventions), admin (health, stats, metrics, versions/rollback)."""
