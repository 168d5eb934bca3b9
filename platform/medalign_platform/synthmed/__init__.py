"""synthmed"""
