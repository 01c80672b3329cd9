"""The live page at ``/ui``: static HTML, CSS and JavaScript shipped inside the package."""
