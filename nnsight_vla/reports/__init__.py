"""Reports from saved results: episode figures (:mod:`.plots`), lens figures (:mod:`.lens_plots`) and the
shared figure machinery (:mod:`.figures`). Reports read results; they never run models."""
