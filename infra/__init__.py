"""Settings, artifact store, cache keys and service launchers: the layer every stage stands on."""
