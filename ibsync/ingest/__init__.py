"""Ingest: a backup source becomes blobs, trees and finally a snapshot."""
