"""neuronserve tune: shapes from traffic and a deployment search within budgets."""
