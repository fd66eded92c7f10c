# Install zrpc's binaries and systemd units.
#   make install                       # into /usr/local, units into /etc/systemd/system
#   make install PREFIX=/usr DESTDIR=/tmp/pkgroot
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= /etc/systemd/system
POLICYDIR ?= /etc/zrpc
DESTDIR ?=
CARGO ?= cargo

BINS = zrpcd zrpc test_server test_client
UNITS = zrpcd.socket zrpcd.service zrpc-test-server.service

.PHONY: build install uninstall test
build:
	$(CARGO) build --release --workspace --bins

install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR)
	for b in $(BINS); do install -m755 target/release/$$b $(DESTDIR)$(BINDIR)/$$b; done
	for u in $(UNITS); do \
	  sed 's|/usr/local/bin|$(BINDIR)|g' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u; \
	  chmod 644 $(DESTDIR)$(UNITDIR)/$$u; \
	done
	# The example access policy where zrpcd looks for it; an existing
	# policy is never overwritten.
	install -d $(DESTDIR)$(POLICYDIR)
	test -e $(DESTDIR)$(POLICYDIR)/policy.toml || install -m644 systemd/policy.toml $(DESTDIR)$(POLICYDIR)/policy.toml

uninstall:
	for b in $(BINS); do rm -f $(DESTDIR)$(BINDIR)/$$b; done
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done

test:
	$(CARGO) test --workspace
