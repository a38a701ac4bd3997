"""What people look at: the HTML report (:mod:`.report`) and how inputs are drawn (:mod:`.render`)."""
