// The floor of a sealed-memfd echo round trip, client -> broker -> service
// -> broker -> client, three processes, no framing, no zrpc
// (docs/performance.md, "Payloads in descriptors"). The client fills a new
// memfd (memfd_create, write, seal) per call; the broker checks and
// forwards the descriptor; the service maps it and sends it back.
// Build: gcc -O2 -o /tmp/memfd_floor bench/scripts/memfd_floor.c
// usage: memfd_floor SIZE ITERS MODE
//   MODE bits: 1 = the service copies the payload into a new memfd instead
//   of echoing the descriptor, 2 = MAP_POPULATE at the receivers, 4 = the
//   receivers read every byte. Also prints the cost of filling a memfd
//   alone and of a warm memcpy.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <time.h>
#include <signal.h>
static size_t SZ; static int MODE;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static void sendfd(int s,int fd){char b[8]={1};struct iovec io={b,8};union{char buf[CMSG_SPACE(sizeof(int))];struct cmsghdr a;}u;
 struct msghdr m={0};m.msg_iov=&io;m.msg_iovlen=1;m.msg_control=u.buf;m.msg_controllen=sizeof u.buf;
 struct cmsghdr*c=CMSG_FIRSTHDR(&m);c->cmsg_level=SOL_SOCKET;c->cmsg_type=SCM_RIGHTS;c->cmsg_len=CMSG_LEN(sizeof(int));memcpy(CMSG_DATA(c),&fd,4);
 if(sendmsg(s,&m,MSG_NOSIGNAL)!=8){perror("sendmsg");exit(1);}}
static int recvfd(int s){char b[8];struct iovec io={b,8};union{char buf[CMSG_SPACE(sizeof(int)*4)];struct cmsghdr a;}u;
 struct msghdr m={0};m.msg_iov=&io;m.msg_iovlen=1;m.msg_control=u.buf;m.msg_controllen=sizeof u.buf;
 if(recvmsg(s,&m,MSG_CMSG_CLOEXEC)<=0)exit(0);
 struct cmsghdr*c=CMSG_FIRSTHDR(&m);if(!c){fprintf(stderr,"no descriptor\n");exit(1);}
 int fd;memcpy(&fd,CMSG_DATA(c),4);return fd;}
static size_t verify(int fd){int se=fcntl(fd,F_GET_SEALS);struct stat st;fstat(fd,&st);if(se<0){perror("seals");exit(1);}return st.st_size;}
static unsigned long consume(int fd,size_t n){char*p=mmap(0,n,PROT_READ,MAP_SHARED|((MODE&2)?MAP_POPULATE:0),fd,0);
 unsigned long s=p[0];if(MODE&4)for(size_t i=0;i<n;i+=64)s+=((volatile char*)p)[i];munmap(p,n);return s;}
static int mk(const char*src,size_t n){int fd=memfd_create("p",MFD_CLOEXEC|MFD_ALLOW_SEALING);if(write(fd,src,n)!=(ssize_t)n){perror("w");exit(1);}
 fcntl(fd,F_ADD_SEALS,F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL);return fd;}
int main(int argc,char**argv){SZ=atol(argv[1]);int it=atoi(argv[2]);MODE=atoi(argv[3]);
 int cb[2],bs[2];socketpair(AF_UNIX,SOCK_STREAM,0,cb);socketpair(AF_UNIX,SOCK_STREAM,0,bs);
 int pb,ps;
 if(!(pb=fork())){ // broker
  for(;;){int fd=recvfd(cb[1]);verify(fd);sendfd(bs[0],fd);close(fd);fd=recvfd(bs[0]);verify(fd);sendfd(cb[1],fd);close(fd);} }
 if(!(ps=fork())){ // service
  char*tmp=malloc(SZ);memset(tmp,1,SZ);
  for(;;){int fd=recvfd(bs[1]);size_t n=verify(fd);
   if(MODE&1){char*p=mmap(0,n,PROT_READ,MAP_SHARED,fd,0);int f2=mk(p,n);munmap(p,n);close(fd);sendfd(bs[1],f2);close(f2);}
   else{consume(fd,n);sendfd(bs[1],fd);close(fd);}}}
 char*src=malloc(SZ);memset(src,0x5a,SZ);
 double*lat=malloc(sizeof(double)*it);double t0=now();
 for(int i=0;i<it;i++){double t=now();int fd=mk(src,SZ);sendfd(cb[0],fd);close(fd);fd=recvfd(cb[0]);consume(fd,verify(fd));close(fd);lat[i]=now()-t;}
 double t1=now();
 // sort
 for(int i=1;i<it;i++){double v=lat[i];int j=i-1;while(j>=0&&lat[j]>v){lat[j+1]=lat[j];j--;}lat[j+1]=v;}
 printf("size %zu mode %d: p50 %.1f us, mean %.1f us, %.0f MB/s one way\n",SZ,MODE,lat[it/2],(t1-t0)/it,SZ*it/(t1-t0));
 // single-process parts
 double a=now();for(int i=0;i<200;i++){int fd=mk(src,SZ);close(fd);}double b=now();
 printf("  memfd_create+write+seal+close alone: %.1f us\n",(b-a)/200);
 char*dst=malloc(SZ);memset(dst,0,SZ);a=now();for(int i=0;i<200;i++){memcpy(dst,src,SZ);__asm__ volatile(""::"r"(dst):"memory");}b=now();
 printf("  memcpy warm 1x: %.1f us\n",(b-a)/200);
 kill(pb,9);kill(ps,9);while(wait(0)>0);return 0;}
