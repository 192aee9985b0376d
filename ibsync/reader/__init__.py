"""Reading snapshots back: walking trees and rehydrating files."""
