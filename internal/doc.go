// Package internal holds the few helpers shared by gpumesh's packages.
package internal
