// Command etcd is the etcd server, built from its module for the tests' control plane:
// kube-apiserver 1.31+ needs health endpoints that Debian's etcd 3.4.23 lacks, and no
// registry here ships etcd binaries. scripts/test-deps.sh builds it into .cache/bin.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
